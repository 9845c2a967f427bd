-- Timeslot export service: the SQLite data contract (SPEC §2).
--
-- Other systems write this database; the export service reads it, and writes only its own `feeds` rows
-- when a user manages their feeds over HTTP. Every CHECK below rejects, at
-- insert/update time, a value the exporter could not represent, so bad data fails where it is written
-- and an export never meets it. Applying this file is idempotent (`timeslot-export initdb`): it creates
-- what is missing and never drops or rewrites data.
--
-- Conventions checked on every column of the kind:
--   timestamp  TEXT 'YYYY-MM-DDTHH:MM:SSZ', a real UTC instant from year 0001 on: the value must survive a
--              round trip through julianday() unchanged, which rejects 2019-02-30, 24:00:00, a space for
--              the 'T', fractions and offsets (strftime() alone echoes 02-30 and 24:00 back).
--   uuid       TEXT, canonical lowercase 8-4-4-4-12 hex: hyphens exactly at those four places, 32 hex digits.
--   digest     TEXT, lowercase hex SHA-256 (64 characters).
--   text       TEXT (never a BLOB or a number); any characters, the exporter escapes them.

PRAGMA journal_mode = WAL;  -- readers never wait for the writer; persistent once set

CREATE TABLE IF NOT EXISTS users (
    id           INTEGER PRIMARY KEY,
    uuid         TEXT NOT NULL UNIQUE
                 CHECK (uuid GLOB '????????-????-????-????-????????????'
                      AND replace(uuid, '-', '') NOT GLOB '*[^0-9a-f]*' AND length(replace(uuid, '-', '')) = 32),
    username     TEXT NOT NULL UNIQUE CHECK (typeof(username) = 'text' AND length(username) > 0),
    token_digest TEXT UNIQUE
                 CHECK (length(token_digest) = 64 AND token_digest NOT GLOB '*[^0-9a-f]*'),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
                 CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(created_at)) IS created_at
                        AND created_at >= '0001'),
    deleted_at   TEXT
                 CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(deleted_at)) IS deleted_at
                        AND deleted_at >= '0001')
);

CREATE TABLE IF NOT EXISTS slot_groups (
    id         INTEGER PRIMARY KEY,
    uuid       TEXT NOT NULL UNIQUE
               CHECK (uuid GLOB '????????-????-????-????-????????????'
                      AND replace(uuid, '-', '') NOT GLOB '*[^0-9a-f]*' AND length(replace(uuid, '-', '')) = 32),
    name       TEXT NOT NULL CHECK (typeof(name) = 'text'),
    owner_id   INTEGER NOT NULL REFERENCES users (id),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
               CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(created_at)) IS created_at
                      AND created_at >= '0001'),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
               CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(updated_at)) IS updated_at
                      AND updated_at >= '0001'),
    deleted_at TEXT
               CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(deleted_at)) IS deleted_at
                      AND deleted_at >= '0001')
);

CREATE TABLE IF NOT EXISTS memberships (
    group_id   INTEGER NOT NULL REFERENCES slot_groups (id),
    user_id    INTEGER NOT NULL REFERENCES users (id),
    deleted_at TEXT
               CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(deleted_at)) IS deleted_at
                      AND deleted_at >= '0001'),
    PRIMARY KEY (group_id, user_id)
);

CREATE TABLE IF NOT EXISTS locations (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '' CHECK (typeof(name) = 'text'),
    street      TEXT CHECK (typeof(street) IN ('text', 'null')),
    postal_code TEXT CHECK (typeof(postal_code) IN ('text', 'null')),
    city        TEXT CHECK (typeof(city) IN ('text', 'null')),
    country     TEXT CHECK (typeof(country) IN ('text', 'null')),
    latitude    REAL CHECK (typeof(latitude) IN ('real', 'integer', 'null') AND latitude BETWEEN -90 AND 90),
    longitude   REAL CHECK (typeof(longitude) IN ('real', 'integer', 'null') AND longitude BETWEEN -180 AND 180),
    CHECK ((latitude IS NULL) = (longitude IS NULL))
);

CREATE TABLE IF NOT EXISTS slots (
    id          INTEGER PRIMARY KEY,
    uuid        TEXT NOT NULL UNIQUE
                CHECK (uuid GLOB '????????-????-????-????-????????????'
                      AND replace(uuid, '-', '') NOT GLOB '*[^0-9a-f]*' AND length(replace(uuid, '-', '')) = 32),
    creator_id  INTEGER NOT NULL REFERENCES users (id),
    title       TEXT NOT NULL CHECK (typeof(title) = 'text'),
    description TEXT NOT NULL DEFAULT '' CHECK (typeof(description) = 'text'),
    start_at    TEXT NOT NULL
                CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(start_at)) IS start_at AND start_at >= '0001'),
    end_at      TEXT
                CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(end_at)) IS end_at AND end_at >= start_at),
    all_day     INTEGER NOT NULL DEFAULT 0 CHECK (all_day IN (0, 1) AND typeof(all_day) = 'integer'),
    -- An RFC 5545 RECUR value (no 'RRULE:' prefix) or ''. Only the grammar's characters are allowed here,
    -- so no line break or property can ride in; the exporter validates the full grammar and leaves out
    -- (and logs) a rule that breaks it.
    rrule       TEXT NOT NULL DEFAULT ''
                CHECK (typeof(rrule) = 'text' AND rrule NOT GLOB '*[^A-Za-z0-9=;,+-]*'),
    visibility  TEXT NOT NULL DEFAULT 'private'
                CHECK (visibility IN ('private', 'friends', 'foaf', 'public')),
    location_id INTEGER REFERENCES locations (id),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
                CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(created_at)) IS created_at
                       AND created_at >= '0001'),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
                CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(updated_at)) IS updated_at
                       AND updated_at >= '0001'),
    deleted_at  TEXT
                CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(deleted_at)) IS deleted_at
                       AND deleted_at >= '0001')
);

-- Columns added after the first release come as ALTER TABLE ... ADD COLUMN, one statement each:
-- `initdb` runs such a statement only when the column is missing, so an old database and a new one end
-- with the same definition, and every row is kept.
--
-- time_zone: '' (UTC, as every slot was before the column existed) or an IANA time zone name such as
-- Europe/Berlin, America/Argentina/Buenos_Aires or Etc/GMT+5, in which the slot is shown and repeated.
-- The name's shape is checked here (1 to 64 of A-Z a-z 0-9 _ + - /, no leading, trailing or double
-- slash, no dot, so it can never walk out of a zoneinfo directory); whether the zone exists is decided
-- at export time by the machine's time zone database.
ALTER TABLE slots ADD COLUMN time_zone TEXT NOT NULL DEFAULT ''
    CONSTRAINT time_zone_is_an_iana_name
    CHECK (typeof(time_zone) = 'text'
           AND (time_zone = '' OR (length(time_zone) <= 64 AND time_zone NOT GLOB '*[^A-Za-z0-9_+/-]*'
                                   AND time_zone NOT GLOB '/*' AND time_zone NOT GLOB '*/'
                                   AND time_zone NOT GLOB '*//*')));

-- One cancelled occurrence of a recurring slot: the UTC instant at which it would have started (for an
-- all-day slot, its date at T00:00:00Z). Exported as EXDATE in the form of the slot's DTSTART.
CREATE TABLE IF NOT EXISTS slot_exdates (
    slot_id       INTEGER NOT NULL REFERENCES slots (id),
    occurrence_at TEXT NOT NULL
                  CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(occurrence_at)) IS occurrence_at
                         AND occurrence_at >= '0001'),
    PRIMARY KEY (slot_id, occurrence_at)
);

CREATE TABLE IF NOT EXISTS slot_alerts (
    slot_id        INTEGER NOT NULL REFERENCES slots (id),
    minutes_before INTEGER NOT NULL CHECK (typeof(minutes_before) = 'integer' AND minutes_before >= 0),
    PRIMARY KEY (slot_id, minutes_before)
);

CREATE TABLE IF NOT EXISTS group_slots (
    group_id   INTEGER NOT NULL REFERENCES slot_groups (id),
    slot_id    INTEGER NOT NULL REFERENCES slots (id),
    deleted_at TEXT
               CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(deleted_at)) IS deleted_at
                      AND deleted_at >= '0001'),
    PRIMARY KEY (group_id, slot_id)
);

CREATE TABLE IF NOT EXISTS feeds (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users (id),
    group_id     INTEGER REFERENCES slot_groups (id),
    token_digest TEXT NOT NULL UNIQUE
                 CHECK (length(token_digest) = 64 AND token_digest NOT GLOB '*[^0-9a-f]*'),
    label        TEXT NOT NULL DEFAULT '' CHECK (typeof(label) = 'text'),
    details      TEXT NOT NULL DEFAULT 'full' CHECK (details IN ('full', 'busy')),
    alarms       INTEGER NOT NULL DEFAULT 1 CHECK (alarms IN (0, 1) AND typeof(alarms) = 'integer'),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
                 CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(created_at)) IS created_at
                        AND created_at >= '0001'),
    revoked_at   TEXT
                 CHECK (strftime('%Y-%m-%dT%H:%M:%SZ', julianday(revoked_at)) IS revoked_at
                        AND revoked_at >= '0001')
);

-- A feed's date window (SPEC §3 "A feed's window"), added in 1.2.0: whole days before and after today's
-- UTC date, each NULL (no bound on that side, as every feed of an older database is) or 0 to 36600.
-- The service writes these (feed management over HTTP); the CHECKs hold for every writer.
ALTER TABLE feeds ADD COLUMN past_days INTEGER
    CONSTRAINT past_days_is_a_day_count
    CHECK (past_days IS NULL OR (typeof(past_days) = 'integer' AND past_days BETWEEN 0 AND 36600));
ALTER TABLE feeds ADD COLUMN future_days INTEGER
    CONSTRAINT future_days_is_a_day_count
    CHECK (future_days IS NULL OR (typeof(future_days) = 'integer' AND future_days BETWEEN 0 AND 36600));

-- Indexes: an export is one range scan in (start_at, uuid) order, with no sort and no table scan.
CREATE INDEX IF NOT EXISTS slots_export ON slots (creator_id, start_at, uuid) WHERE deleted_at IS NULL;
-- The time zones of a user's timed slots and the earliest start in each, found before the first event is
-- written (the calendar's VTIMEZONEs come first) by hopping from zone to zone in this small partial index.
CREATE INDEX IF NOT EXISTS slots_zones ON slots (creator_id, time_zone, start_at)
    WHERE deleted_at IS NULL AND all_day = 0 AND time_zone <> '';
CREATE INDEX IF NOT EXISTS slots_location ON slots (location_id) WHERE location_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS group_slots_slot ON group_slots (slot_id);
CREATE INDEX IF NOT EXISTS memberships_user ON memberships (user_id);
CREATE INDEX IF NOT EXISTS slot_groups_owner ON slot_groups (owner_id);
CREATE INDEX IF NOT EXISTS feeds_user ON feeds (user_id);

-- Export versions: a counter per user that advances whenever anything that user's exports show may have
-- changed. The service's ETag is (module version, user, this counter, request parameters), so a
-- conditional request costs one indexed lookup instead of a second pass over the rows, and another user's
-- writes leave this user's ETags alone. It is a counter, not a foreign key: it outlives its user row.
CREATE TABLE IF NOT EXISTS export_versions (
    user_id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0
);

CREATE TRIGGER IF NOT EXISTS slots_insert_version AFTER INSERT ON slots BEGIN
    INSERT INTO export_versions (user_id) VALUES (NEW.creator_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS slots_update_version AFTER UPDATE ON slots BEGIN
    INSERT INTO export_versions (user_id) VALUES (OLD.creator_id), (NEW.creator_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS slots_delete_version AFTER DELETE ON slots BEGIN
    INSERT INTO export_versions (user_id) VALUES (OLD.creator_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER IF NOT EXISTS slot_alerts_insert_version AFTER INSERT ON slot_alerts BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id = NEW.slot_id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS slot_alerts_update_version AFTER UPDATE ON slot_alerts BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id IN (OLD.slot_id, NEW.slot_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS slot_alerts_delete_version AFTER DELETE ON slot_alerts BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id = OLD.slot_id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER IF NOT EXISTS slot_exdates_insert_version AFTER INSERT ON slot_exdates BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id = NEW.slot_id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS slot_exdates_update_version AFTER UPDATE ON slot_exdates BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id IN (OLD.slot_id, NEW.slot_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS slot_exdates_delete_version AFTER DELETE ON slot_exdates BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id = OLD.slot_id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER IF NOT EXISTS group_slots_insert_version AFTER INSERT ON group_slots BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id = NEW.slot_id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS group_slots_update_version AFTER UPDATE ON group_slots BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id IN (OLD.slot_id, NEW.slot_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS group_slots_delete_version AFTER DELETE ON group_slots BEGIN
    INSERT INTO export_versions (user_id) SELECT creator_id FROM slots WHERE id = OLD.slot_id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER IF NOT EXISTS locations_update_version AFTER UPDATE ON locations BEGIN
    INSERT INTO export_versions (user_id) SELECT DISTINCT creator_id FROM slots WHERE location_id = OLD.id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS locations_delete_version AFTER DELETE ON locations BEGIN
    INSERT INTO export_versions (user_id) SELECT DISTINCT creator_id FROM slots WHERE location_id = OLD.id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

-- A group's name, owner or deletion shows in the exports of its owner and of every member.
CREATE TRIGGER IF NOT EXISTS slot_groups_update_version AFTER UPDATE ON slot_groups BEGIN
    INSERT INTO export_versions (user_id)
        SELECT OLD.owner_id UNION SELECT NEW.owner_id
        UNION SELECT user_id FROM memberships WHERE group_id IN (OLD.id, NEW.id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS slot_groups_delete_version AFTER DELETE ON slot_groups BEGIN
    INSERT INTO export_versions (user_id)
        SELECT OLD.owner_id UNION SELECT user_id FROM memberships WHERE group_id = OLD.id
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER IF NOT EXISTS memberships_insert_version AFTER INSERT ON memberships BEGIN
    INSERT INTO export_versions (user_id) VALUES (NEW.user_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS memberships_update_version AFTER UPDATE ON memberships BEGIN
    INSERT INTO export_versions (user_id) VALUES (OLD.user_id), (NEW.user_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS memberships_delete_version AFTER DELETE ON memberships BEGIN
    INSERT INTO export_versions (user_id) VALUES (OLD.user_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

-- Last-Modified (SPEC §3 "Success"), added in 1.2.0: `changed` is when the user's exported data last changed,
-- in whole Unix seconds rounded up (the second after the change began), moved by these triggers whenever
-- `version` is, from the database's own clock, never from `updated_at`; it never goes backwards. Writers set
-- nothing. Several changes within one second share it, so the service tells them apart by the moment it
-- reads: a date is only handed out for a state that no write still in progress can share (docs/caching.md,
-- "Last-Modified"). An `initdb` on an older database starts every existing user's clock at that moment.
ALTER TABLE export_versions ADD COLUMN changed INTEGER;
CREATE TRIGGER IF NOT EXISTS export_versions_changed_insert AFTER INSERT ON export_versions BEGIN
    UPDATE export_versions SET changed = max(coalesce(changed, 0), CAST(strftime('%s', 'now') AS INTEGER) + 1)
        WHERE user_id = NEW.user_id;
END;
CREATE TRIGGER IF NOT EXISTS export_versions_changed_update AFTER UPDATE OF version ON export_versions BEGIN
    UPDATE export_versions SET changed = max(coalesce(changed, 0), CAST(strftime('%s', 'now') AS INTEGER) + 1)
        WHERE user_id = NEW.user_id;
END;
UPDATE export_versions SET changed = CAST(strftime('%s', 'now') AS INTEGER) + 1 WHERE changed IS NULL;
-- A feed's details, alarms and window show in its calendar: a change of them is a change of its user's data.
CREATE TRIGGER IF NOT EXISTS feeds_update_version AFTER UPDATE OF details, alarms, past_days, future_days ON feeds
    WHEN OLD.details IS NOT NEW.details OR OLD.alarms IS NOT NEW.alarms OR OLD.past_days IS NOT NEW.past_days
         OR OLD.future_days IS NOT NEW.future_days
BEGIN
    INSERT INTO export_versions (user_id) VALUES (NEW.user_id)
        ON CONFLICT (user_id) DO UPDATE SET version = version + 1;
END;

-- Date windows (SPEC §3 "from", "to"; a feed's past_days and future_days), added in 1.2.0: the span of time
-- each slot can occupy, kept by triggers, so that a window of a long history is an index search. A span
-- runs from the slot's start (an all-day slot's date at 00:00Z) to the end of its last possible occurrence:
-- the end of the slot itself, or for a slot with a rule, its UNTIL's date plus two days (whatever the zone
-- the UNTIL is read in) plus the slot's duration, and '9999-12-31T23:59:59Z' for a rule without UNTIL.
-- The span is a bound, never exact: which slots a window selects is decided by the service from the rows
-- an index search finds. `span_class` sorts spans by length (at most 1, 8, 64, 512 days, or longer), so that
-- each class is one range of `span_start`: a 30-day window of a 20-year history reads about the slots in it.
CREATE TABLE IF NOT EXISTS slot_spans (
    slot_id    INTEGER PRIMARY KEY,
    creator_id INTEGER NOT NULL,
    span_class INTEGER NOT NULL,
    span_start TEXT NOT NULL,
    span_end   TEXT NOT NULL,
    zoned      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS slot_spans_start ON slot_spans (creator_id, span_class, span_start, span_end, zoned);
CREATE INDEX IF NOT EXISTS slot_spans_end ON slot_spans (creator_id, span_end, span_start, zoned) WHERE span_class = 4;
CREATE VIEW IF NOT EXISTS slot_span_values AS
    SELECT slot_id, creator_id,
           CASE WHEN days <= 1 THEN 0 WHEN days <= 8 THEN 1 WHEN days <= 64 THEN 2 WHEN days <= 512 THEN 3 ELSE 4 END
               AS span_class,
           span_start, span_end, zoned
    FROM (SELECT slot_id, creator_id, span_start, span_end, zoned,
                 julianday(span_end) - julianday(span_start) AS days
          FROM (SELECT slot_id, creator_id, span_start, zoned,
                       coalesce(CASE WHEN rrule = '' THEN occurrence_end
                                     WHEN until IS NULL THEN NULL
                                     ELSE strftime('%Y-%m-%dT%H:%M:%SZ', julianday(until) + 2
                                                   + julianday(occurrence_end) - julianday(span_start)) END,
                                '9999-12-31T23:59:59Z') AS span_end
                FROM (SELECT s.id AS slot_id, s.creator_id, s.rrule,
                             s.all_day = 0 AND s.time_zone <> '' AS zoned,
                             CASE WHEN s.all_day THEN date(s.start_at) || 'T00:00:00Z' ELSE s.start_at END
                                 AS span_start,
                             CASE WHEN s.all_day
                                  THEN coalesce(date(coalesce(s.end_at, s.start_at), '+1 day') || 'T00:00:00Z',
                                                '9999-12-31T23:59:59Z')
                                  ELSE coalesce(s.end_at, s.start_at) END AS occurrence_end,
                             CASE WHEN instr(upper(s.rrule), 'UNTIL=') > 0
                                  THEN substr(upper(s.rrule), instr(upper(s.rrule), 'UNTIL=') + 6, 4) || '-'
                                       || substr(upper(s.rrule), instr(upper(s.rrule), 'UNTIL=') + 10, 2) || '-'
                                       || substr(upper(s.rrule), instr(upper(s.rrule), 'UNTIL=') + 12, 2) END
                                 AS until
                      FROM slots s)));
CREATE TRIGGER IF NOT EXISTS slots_insert_span AFTER INSERT ON slots BEGIN
    DELETE FROM slot_spans WHERE slot_id = NEW.id;
    INSERT INTO slot_spans SELECT * FROM slot_span_values WHERE slot_id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS slots_update_span AFTER UPDATE ON slots BEGIN
    DELETE FROM slot_spans WHERE slot_id IN (OLD.id, NEW.id);
    INSERT INTO slot_spans SELECT * FROM slot_span_values WHERE slot_id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS slots_delete_span AFTER DELETE ON slots BEGIN
    DELETE FROM slot_spans WHERE slot_id = OLD.id;
END;
-- An older database's slots get their spans when `initdb` brings it up to date (and any left without a
-- slot go).
INSERT OR IGNORE INTO slot_spans SELECT * FROM slot_span_values;
DELETE FROM slot_spans WHERE slot_id NOT IN (SELECT id FROM slots);
