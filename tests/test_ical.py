"""SPEC §4: the iCalendar writer, exact to the octet."""

import logging
import random
import re

import pytest

import timeslot_export
from timeslot_export import escape_text, fold_line, format_decimal, format_recurrence, text_property
from conftest import auth, events, uids

EXPORT = "/v1/export/ical"


# --- a test-local reader: unfold (RFC 5545 §3.1), then unescape TEXT (§3.3.11) ------------------------------

def unfold(text):
    return text.replace("\r\n ", "")


def unescape(value):
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\":
            nxt = value[i + 1]
            out.append({"n": "\n", "N": "\n", "\\": "\\", ";": ";", ",": ","}[nxt])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def read_text(line):
    """The value of one folded TEXT property line, as a client sees it."""
    name, _, value = unfold(line).partition(":")
    return unescape(value)


def expected_text(value):
    """What a client must see for a stored value: breaks as newlines, other controls gone, surrogates U+FFFD."""
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    value = re.sub("[\x00-\x08\x0b-\x1f\x7f]", "", value)
    return re.sub("[\ud800-\udfff]", "\ufffd", value)


def blank(value):
    """SPEC §4: text that is empty once control characters are dropped, or only spaces and TABs, is not written."""
    return re.sub("[\x00-\x08\x0a-\x1f\x7f]", "", value).strip(" \t") == ""


def physical_lines(text):
    return text.split("\r\n")


# --- escaping and folding, exact lines ----------------------------------------------------------------------

@pytest.mark.parametrize("title, line", [
    ("", "SUMMARY:"),
    ("plain", "SUMMARY:plain"),
    ("a;b,c:d", "SUMMARY:a\\;b\\,c:d"),
    ("back\\slash", "SUMMARY:back\\\\slash"),
    ("literal \\n stays", "SUMMARY:literal \\\\n stays"),
    ("crlf\r\nline", "SUMMARY:crlf\\nline"),
    ("lone\rcr", "SUMMARY:lone\\ncr"),
    ("lf\nline", "SUMMARY:lf\\nline"),
    ("two\r\n\r\nbreaks", "SUMMARY:two\\n\\nbreaks"),
    ("lf-cr\n\rpair", "SUMMARY:lf-cr\\n\\npair"),
    ("END:VEVENT\r\nBEGIN:VEVENT", "SUMMARY:END:VEVENT\\nBEGIN:VEVENT"),
    ("nul\x00byte", "SUMMARY:nulbyte"),
    ("del\x7fete", "SUMMARY:delete"),
    ("bell\x07 esc\x1b vt\x0b ff\x0c", "SUMMARY:bell esc vt ff"),
    ("tab\tkept", "SUMMARY:tab\tkept"),
    ("line\u2028para\u2029sep", "SUMMARY:line\u2028para\u2029sep"),
    ("combining e\u0301 a\u0308", "SUMMARY:combining e\u0301 a\u0308"),
    ("  spaces kept  ", "SUMMARY:  spaces kept  "),
    ("lone \ud800 surrogate", "SUMMARY:lone \ufffd surrogate"),
    # 74 octets of title ending in a 3-byte character: 8 + 67 octets, then the rest after one space.
    ("a" * 71 + "\u20ac", "SUMMARY:" + "a" * 67 + "\r\n " + "aaaa\u20ac"),
    # a 3-byte character that would straddle octet 75 moves to the next line whole
    ("a" * 66 + "\u20ac", "SUMMARY:" + "a" * 66 + "\r\n \u20ac"),
    # an emoji (4 octets) across the fold point
    ("a" * 65 + "\U0001F600" + "b", "SUMMARY:" + "a" * 65 + "\r\n \U0001F600b"),
    # exactly 75 octets: no fold
    ("a" * 67, "SUMMARY:" + "a" * 67),
    ("a" * 68, "SUMMARY:" + "a" * 67 + "\r\n a"),
    # never between a backslash and the character it escapes
    ("a" * 66 + ",", "SUMMARY:" + "a" * 66 + "\r\n \\,"),
    ("a" * 65 + "\\,", "SUMMARY:" + "a" * 65 + "\\\\\r\n \\,"),
    ("a" * 66 + "\\", "SUMMARY:" + "a" * 66 + "\r\n \\\\"),
])
def test_text_property_lines(title, line):
    assert text_property("SUMMARY", title) == line + "\r\n"


def test_ten_thousand_character_word_folds_into_full_lines():
    folded = text_property("DESCRIPTION", "x" * 10000)
    lines = physical_lines(folded)[:-1]
    assert lines[0] == "DESCRIPTION:" + "x" * 63
    assert all(line == " " + "x" * 74 for line in lines[1:-1])
    assert len(lines[-1].encode()) <= 75
    assert read_text(folded[:-2]) == "x" * 10000


def test_folding_is_greedy_for_multibyte_text():
    folded = fold_line("DESCRIPTION:" + "\u00e9" * 200)   # 2 octets each
    lines = folded.split("\r\n")
    assert len(lines[0].encode()) == 74          # 12 + 31 * 2; a 32nd would need octet 76
    assert all(len(line.encode()) == 75 for line in lines[1:-1])  # " " + 37 * 2


def test_ascii_escape_of_text_without_specials_is_the_same_object():
    value = "nothing to do here"
    assert escape_text(value) is value


# --- the round-trip property -------------------------------------------------------------------------------

def random_text(generator, length):
    """Characters from all of Unicode (surrogates and controls included), weighted toward the tricky ones."""
    pools = [lambda: chr(generator.randrange(0x110000)), lambda: chr(generator.randrange(0x20)),
             lambda: generator.choice("\\;,:\r\n\"'\t "), lambda: chr(generator.randrange(0x80, 0x800)),
             lambda: chr(generator.randrange(0x1F300, 0x1FAFF)), lambda: "a"]
    return "".join(generator.choice(pools)() for _ in range(length))


def test_random_strings_round_trip_through_escape_and_fold():
    generator = random.Random(20261123)
    for _ in range(5000):
        value = random_text(generator, generator.randrange(0, 300))
        line = text_property("DESCRIPTION", value)
        assert line.endswith("\r\n")
        body = line[:-2]
        encoded = body.encode("utf-8")                     # never a lone surrogate left
        assert all(len(physical.encode("utf-8")) <= 75 for physical in physical_lines(body))
        assert b"\r" not in encoded.replace(b"\r\n ", b"") and b"\n" not in encoded.replace(b"\r\n ", b"")
        assert all(physical.startswith(" ") for physical in physical_lines(body)[1:])
        assert read_text(body) == expected_text(value)


def test_random_slots_export_with_one_event_each_and_exact_text(client, data):
    generator = random.Random(5545)
    user_id, token = data.user()
    stored = {}
    for _ in range(300):
        title = expected_text(random_text(generator, generator.randrange(0, 120))).replace("\ufffd", "?")
        description = random_text(generator, generator.randrange(0, 400)).encode("utf-8", "replace").decode()
        _, slot_uuid = data.slot(user_id, title=title, description=description)
        stored[slot_uuid] = (title, description)
    body = client.post(EXPORT, headers=auth(token)).body
    assert body.count(b"BEGIN:VEVENT") == body.count(b"END:VEVENT") == len(events(body)) == 300
    text = body.decode("utf-8")
    assert all(len(line.encode()) <= 75 for line in physical_lines(text))
    for event in events(body):
        fields = dict(line.split(":", 1) for line in event if ":" in line and not line.startswith(" "))
        title, description = stored[fields["UID"]]
        for name, value in (("SUMMARY", title), ("DESCRIPTION", description)):
            if blank(value):
                assert name not in fields
            else:
                assert unescape(fields[name]) == expected_text(value)


# --- every property, in order ------------------------------------------------------------------------------

def test_full_event_has_every_property_in_order(client, data):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id, name="Team; A, B")
    location = data.location(name="HQ", street="Main St 1", postal_code="10117", city="Berlin", country="DE",
                             latitude=52.520008, longitude=13.404954)
    data.slot(user_id, uuid="db439ff9-c014-4f87-8a4a-50f772270fdf", title="Slot title 19", description="Line 1\nLine 2",
              start_at="2019-09-20T19:44:02Z", end_at="2019-10-20T19:44:02Z", created_at="2016-08-30T09:50:42Z",
              updated_at="2016-08-31T10:00:00Z", visibility="public", rrule="FREQ=WEEKLY;COUNT=3",
              location_id=location, groups=[group_id], alerts=[30, 5])
    body = client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token)).body.decode()
    assert body == (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Timeslot//Timeslot Export//EN\r\nCALSCALE:GREGORIAN\r\n"
        "METHOD:PUBLISH\r\nNAME:Team\\; A\\, B\r\nX-WR-CALNAME:Team\\; A\\, B\r\n"
        "BEGIN:VEVENT\r\nUID:db439ff9-c014-4f87-8a4a-50f772270fdf\r\nDTSTAMP:20160831T100000Z\r\n"
        "CREATED:20160830T095042Z\r\nLAST-MODIFIED:20160831T100000Z\r\nDTSTART:20190920T194402Z\r\n"
        "DTEND:20191020T194402Z\r\nRRULE:FREQ=WEEKLY;COUNT=3\r\nCLASS:PUBLIC\r\nSUMMARY:Slot title 19\r\n"
        "DESCRIPTION:Line 1\\nLine 2\r\nLOCATION:HQ\\, Main St 1\\, 10117 Berlin\\, DE\r\n"
        "GEO:52.520008;13.404954\r\n"
        "BEGIN:VALARM\r\nACTION:DISPLAY\r\nDESCRIPTION:Slot title 19\r\nTRIGGER:-PT5M\r\nEND:VALARM\r\n"
        "BEGIN:VALARM\r\nACTION:DISPLAY\r\nDESCRIPTION:Slot title 19\r\nTRIGGER:-PT30M\r\nEND:VALARM\r\n"
        "END:VEVENT\r\nEND:VCALENDAR\r\n")


def one_event(client, data, **slot):
    user_id, token = data.user()
    data.slot(user_id, **slot)
    (event,) = events(client.post(EXPORT, headers=auth(token)).body)
    return event


@pytest.mark.parametrize("visibility, klass", [("public", "PUBLIC"), ("private", "PRIVATE"),
                                               ("friends", "CONFIDENTIAL"), ("foaf", "CONFIDENTIAL")])
def test_class_follows_visibility(client, data, visibility, klass):
    assert f"CLASS:{klass}" in one_event(client, data, visibility=visibility)


@pytest.mark.parametrize("start, end, all_day, expected", [
    ("2019-09-20T19:44:02Z", None, 0, ["DTSTART:20190920T194402Z"]),
    ("2019-09-20T19:44:02Z", "2019-09-20T19:44:02Z", 0, ["DTSTART:20190920T194402Z"]),
    ("2019-09-20T19:44:02Z", "2019-09-20T20:00:00Z", 0, ["DTSTART:20190920T194402Z", "DTEND:20190920T200000Z"]),
    ("2019-09-20T00:00:00Z", None, 1, ["DTSTART;VALUE=DATE:20190920", "DTEND;VALUE=DATE:20190921"]),
    ("2019-09-20T00:00:00Z", "2019-09-20T00:00:00Z", 1, ["DTSTART;VALUE=DATE:20190920", "DTEND;VALUE=DATE:20190921"]),
    ("2019-12-30T00:00:00Z", "2020-01-02T00:00:00Z", 1, ["DTSTART;VALUE=DATE:20191230", "DTEND;VALUE=DATE:20200103"]),
    ("2020-02-28T00:00:00Z", "2020-02-28T00:00:00Z", 1, ["DTSTART;VALUE=DATE:20200228", "DTEND;VALUE=DATE:20200229"]),
    ("2019-09-20T13:30:00Z", "2019-09-21T08:00:00Z", 1, ["DTSTART;VALUE=DATE:20190920", "DTEND;VALUE=DATE:20190922"]),
    ("9999-12-30T00:00:00Z", "9999-12-31T00:00:00Z", 1, ["DTSTART;VALUE=DATE:99991230"]),
    ("9999-12-31T00:00:00Z", None, 1, ["DTSTART;VALUE=DATE:99991231"]),
    ("0001-01-01T00:00:00Z", None, 1, ["DTSTART;VALUE=DATE:00010101", "DTEND;VALUE=DATE:00010102"]),
])
def test_start_and_end(client, data, start, end, all_day, expected):
    event = one_event(client, data, start_at=start, end_at=end, all_day=all_day)
    assert [line for line in event if line.startswith(("DTSTART", "DTEND"))] == expected


@pytest.mark.parametrize("location, expected", [
    ({"name": "HQ"}, "LOCATION:HQ"),
    ({"street": "Main St 1", "city": "Berlin"}, "LOCATION:Main St 1\\, Berlin"),
    ({"postal_code": "10117"}, "LOCATION:10117"),
    ({"name": "A", "postal_code": "1", "city": "B", "country": "C"}, "LOCATION:A\\, 1 B\\, C"),
    ({"name": "", "street": "", "city": "", "country": ""}, None),
    ({"name": " ", "street": "Main St 1", "postal_code": "\t", "city": "Berlin", "country": " "},
     "LOCATION:Main St 1\\, Berlin"),                                # blank parts would show as stray commas
    ({"latitude": 1e-05, "longitude": -0.5}, None),
])
def test_location_joins_the_non_empty_parts(client, data, location, expected):
    event = one_event(client, data, location_id=data.location(**location))
    assert [line for line in event if line.startswith("LOCATION")] == ([expected] if expected else [])


def test_geo_is_written_without_location_text(client, data):
    event = one_event(client, data, location_id=data.location(latitude=1e-05, longitude=-0.5))
    assert "GEO:0.00001;-0.5" in event


@pytest.mark.parametrize("value, text", [(1e-05, "0.00001"), (52.520008, "52.520008"), (-0.0000001, "0"),
                                         (90, "90"), (-180.0, "-180"), (12.3456789, "12.345679"), (0.0, "0"),
                                         (-33.8688, "-33.8688"), (1e-07, "0")])
def test_decimals_never_use_exponent_notation(value, text):
    assert format_decimal(value) == text


def test_alarms_ascending_with_the_title(client, data):
    event = one_event(client, data, title="Call, now", alerts=[60, 0, 15])
    alarms = "\n".join(event).split("BEGIN:VALARM")[1:]
    assert [re.search(r"TRIGGER:(\S+)", alarm).group(1) for alarm in alarms] == ["-PT0M", "-PT15M", "-PT60M"]
    assert all("ACTION:DISPLAY\nDESCRIPTION:Call\\, now\n" in alarm for alarm in alarms)


@pytest.mark.parametrize("text", ["", " ", "\t", " \t  ", "\x00", "\x07 \x1b", "\r\n", " \n\t\x7f "])
def test_blank_text_properties_are_left_out_and_the_alarm_says_reminder(client, data, text):
    """libical reports an empty value as an error and deletes the property (it trims white space first)."""
    location = data.location(name=text, city=text)
    event = one_event(client, data, title=text, description=text, location_id=location, alerts=[10])
    names = [line.split(":", 1)[0].split(";", 1)[0] for line in event]
    assert "SUMMARY" not in names and "LOCATION" not in names
    assert names.count("DESCRIPTION") == 1                            # the alarm's own, which §3.6.6 requires
    assert "ACTION:DISPLAY" in event and "DESCRIPTION:Reminder" in event


@pytest.mark.parametrize("text, line", [
    ("x", "SUMMARY:x"), (" x ", "SUMMARY: x "), ("\tx", "SUMMARY:\tx"), ("\x00x", "SUMMARY:x"),
    ("\u2028", "SUMMARY:\u2028"), ("\u00a0", "SUMMARY:\u00a0")
])
def test_text_with_something_to_show_is_written_as_stored(client, data, text, line):
    event = one_event(client, data, title=text, alerts=[10])
    assert line in event and "DESCRIPTION:" + line[len("SUMMARY:"):] in event    # the alarm repeats the title


def test_a_group_with_a_blank_name_is_called_timeslot(client, data):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id, name=" \t")
    body = client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token)).body
    assert b"\r\nNAME:Timeslot\r\nX-WR-CALNAME:Timeslot\r\n" in body


def test_text_that_is_not_utf8_becomes_replacement_characters(client, data):
    user_id, token = data.user()
    data.slot(user_id, title="ok")
    data.run("UPDATE slots SET title = CAST(x'41ff42' AS TEXT), description = CAST(x'c3' AS TEXT)")
    location = data.location(name="x")
    data.run("UPDATE locations SET name = CAST(x'fe' AS TEXT), city = CAST(x'e282' AS TEXT)")
    data.run("UPDATE slots SET location_id = ?", (location,))
    (event,) = events(client.post(EXPORT, headers=auth(token)).body)
    assert "SUMMARY:A\ufffdB" in event and "DESCRIPTION:\ufffd" in event
    assert "LOCATION:\ufffd\\, \ufffd" in event


def test_group_name_that_is_not_utf8_is_replaced_too(client, data):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id)
    data.run("UPDATE slot_groups SET name = CAST(x'ff' AS TEXT)")
    assert b"NAME:\xef\xbf\xbd\r\n" in client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token)).body


def test_no_stored_value_can_add_a_property_or_component(client, data):
    user_id, token = data.user()
    attack = "x\r\nEND:VEVENT\r\nBEGIN:VEVENT\r\nUID:evil\r\nSUMMARY:injected\nATTACH:http://evil\r"
    location = data.location(name=attack, street=attack, city=attack, country=attack)
    group_id, group_uuid = data.group(user_id, name=attack)
    data.slot(user_id, title=attack, description=attack, location_id=location, groups=[group_id], alerts=[1])
    for response in (client.post(EXPORT, headers=auth(token)),
                     client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token))):
        lines = unfold(response.body.decode()).split("\r\n")
        names = [line.split(":", 1)[0].split(";", 1)[0] for line in lines if line]
        assert names.count("BEGIN") == 3 and names.count("END") == 3   # VCALENDAR, VEVENT, VALARM
        assert "UID" in names and "ATTACH" not in names and names.count("UID") == 1


def test_output_is_deterministic(client, data):
    user_id, token = data.user()
    for n in range(50):
        data.slot(user_id, title=f"same start {n}", start_at="2019-01-01T00:00:00Z", alerts=[n % 3, 7])
    first = client.post(EXPORT, headers=auth(token))
    second = client.post(EXPORT, headers=auth(token))
    assert first.body == second.body and first.headers["ETag"] == second.headers["ETag"]
    assert uids(first.body) == sorted(uids(first.body)), "same start: ordered by uuid"


def test_no_bom_no_blank_lines_crlf_only(client, data):
    user_id, token = data.user()
    data.slot(user_id, title="x\n\ny", description="\r\n")
    body = client.post(EXPORT, headers=auth(token)).body
    assert not body.startswith(b"\xef\xbb\xbf")
    assert b"\r\n\r\n" not in body and body.endswith(b"END:VCALENDAR\r\n")
    assert body.count(b"\n") == body.count(b"\r\n") and body.count(b"\r") == body.count(b"\r\n")


# --- RRULE ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, all_day, line", [
    ("", False, ""),
    ("FREQ=DAILY", False, "RRULE:FREQ=DAILY"),
    ("freq=weekly;byday=mo,we", False, "RRULE:FREQ=WEEKLY;BYDAY=MO,WE"),
    ("COUNT=5;FREQ=DAILY", False, "RRULE:FREQ=DAILY;COUNT=5"),
    ("FREQ=MONTHLY;BYDAY=-1SU", False, "RRULE:FREQ=MONTHLY;BYDAY=-1SU"),
    ("FREQ=MONTHLY;BYDAY=+2MO,1FR", False, "RRULE:FREQ=MONTHLY;BYDAY=+2MO,1FR"),
    ("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=-1", False, "RRULE:FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=-1"),
    ("FREQ=YEARLY;BYWEEKNO=20,-1;BYDAY=MO", False, "RRULE:FREQ=YEARLY;BYWEEKNO=20,-1;BYDAY=MO"),
    ("FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-1", False, "RRULE:FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-1"),
    ("FREQ=HOURLY;INTERVAL=3;BYHOUR=9,12;BYMINUTE=0,30;BYSECOND=0,60;WKST=SU", False,
     "RRULE:FREQ=HOURLY;INTERVAL=3;BYHOUR=9,12;BYMINUTE=0,30;BYSECOND=0,60;WKST=S\r\n U"),
    ("FREQ=YEARLY;BYYEARDAY=1,-366", False, "RRULE:FREQ=YEARLY;BYYEARDAY=1,-366"),
    ("FREQ=DAILY;UNTIL=20200101T120000Z", False, "RRULE:FREQ=DAILY;UNTIL=20200101T120000Z"),
    ("FREQ=DAILY;UNTIL=20200101", False, "RRULE:FREQ=DAILY;UNTIL=20200101T235959Z"),
    ("FREQ=DAILY;UNTIL=20200101T120000", False, "RRULE:FREQ=DAILY;UNTIL=20200101T120000Z"),
    ("FREQ=DAILY;UNTIL=20200101T120000Z", True, "RRULE:FREQ=DAILY;UNTIL=20200101"),
    ("FREQ=DAILY;UNTIL=20200101", True, "RRULE:FREQ=DAILY;UNTIL=20200101"),
    ("FREQ=MINUTELY;BYMONTHDAY=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27", False,
     "RRULE:FREQ=MINUTELY;BYMONTHDAY=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18\r\n ,19,20,21,22,23,24,25,26,27"),
])
def test_valid_rules_are_written(rule, all_day, line):
    written, problem = format_recurrence(rule, all_day)
    assert problem is None
    assert written == (line + "\r\n" if line else "")


@pytest.mark.parametrize("rule, why", [
    ("DAILY", "not NAME=VALUE"), ("FREQ=", "not NAME=VALUE"), ("FREQ=DAILY;", "not NAME=VALUE"),
    ("COUNT=3", "FREQ is required"), ("FREQ=FORTNIGHTLY", "invalid FREQ"), ("FREQ=DAILY;FREQ=DAILY", "more than once"),
    ("FREQ=DAILY;X-NAME=1", "unknown rule part"), ("FREQ=DAILY;COUNT=2;UNTIL=20200101", "COUNT and UNTIL"),
    ("FREQ=MONTHLY;BYWEEKNO=1", "BYWEEKNO"), ("FREQ=WEEKLY;BYMONTHDAY=1", "BYMONTHDAY"),
    ("FREQ=DAILY;BYYEARDAY=1", "BYYEARDAY"), ("FREQ=MONTHLY;BYYEARDAY=1", "BYYEARDAY"),
    ("FREQ=WEEKLY;BYDAY=1MO", "numbered BYDAY"), ("FREQ=DAILY;BYDAY=-1SU", "numbered BYDAY"),
    ("FREQ=YEARLY;BYWEEKNO=1;BYDAY=1MO", "numbered BYDAY"), ("FREQ=DAILY;BYSETPOS=1", "BYSETPOS"),
    ("FREQ=MONTHLY;BYDAY=0MO", "invalid BYDAY"), ("FREQ=MONTHLY;BYDAY=54MO", "invalid BYDAY"),
    ("FREQ=MONTHLY;BYDAY=MON", "invalid BYDAY"), ("FREQ=MONTHLY;BYMONTHDAY=0", "invalid BYMONTHDAY"),
    ("FREQ=MONTHLY;BYMONTHDAY=32", "invalid BYMONTHDAY"), ("FREQ=YEARLY;BYMONTH=13", "invalid BYMONTH"),
    ("FREQ=YEARLY;BYMONTH=-1", "invalid BYMONTH"), ("FREQ=DAILY;BYHOUR=24", "invalid BYHOUR"),
    ("FREQ=DAILY;BYMINUTE=60", "invalid BYMINUTE"), ("FREQ=DAILY;BYSECOND=61", "invalid BYSECOND"),
    ("FREQ=YEARLY;BYYEARDAY=367", "invalid BYYEARDAY"), ("FREQ=YEARLY;BYWEEKNO=54", "invalid BYWEEKNO"),
    ("FREQ=DAILY;COUNT=0", "invalid COUNT"), ("FREQ=DAILY;INTERVAL=0", "invalid INTERVAL"),
    ("FREQ=DAILY;COUNT=-1", "invalid COUNT"), ("FREQ=DAILY;UNTIL=20190230", "invalid UNTIL"),
    ("FREQ=DAILY;UNTIL=20190101T250000Z", "invalid UNTIL"), ("FREQ=DAILY;UNTIL=2019-01-01", "invalid UNTIL"),
    ("FREQ=DAILY;WKST=XX", "invalid WKST"), ("FREQ=DAILY;BYDAY=MO,,TU", "invalid BYDAY"),
    ("FREQ=MONTHLY;BYMONTHDAY=+-1", "invalid BYMONTHDAY"), ("FREQ=MONTHLY;BYMONTHDAY=001", "invalid BYMONTHDAY"),
])
def test_invalid_rules_are_refused_with_a_reason(rule, why):
    written, problem = format_recurrence(rule, False)
    assert written == ""
    assert problem and why in problem


def test_invalid_rule_is_left_out_and_logged_and_the_export_goes_on(client, data, caplog):
    user_id, token = data.user()
    _, bad = data.slot(user_id, title="bad rule", rrule="FREQ=WEEKLY;BYMONTHDAY=1", start_at="2019-01-01T00:00:00Z")
    _, good = data.slot(user_id, title="good rule", rrule="FREQ=DAILY", start_at="2019-01-02T00:00:00Z")
    response = client.post(EXPORT, headers=auth(token))
    first, second = events(response.body)
    assert not [line for line in first if line.startswith("RRULE")] and "SUMMARY:bad rule" in first
    assert "RRULE:FREQ=DAILY" in second
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bad in message and "BYMONTHDAY" in message for message in warnings)
    assert not any(good in message for message in warnings)


# --- busy and alarm-free styles (used by feeds) --------------------------------------------------------------

def test_busy_style_shows_nothing_personal():
    row = ("u", "20190101T000000Z", "20190101T000000Z", "20190102T100000Z", "20190102T110000Z", 0, "FREQ=DAILY",
           "public", b"Secret title", b"Secret description", b"Secret place", None, None, None, None, 1.0, 2.0, "5",
           "", "20190103T100000Z")
    event = timeslot_export.write_event(row, timeslot_export.CalendarStyle(busy=True, alarms=False)).decode("utf-8")
    assert "Secret" not in event and "GEO" not in event and "VALARM" not in event and "DESCRIPTION" not in event
    assert "SUMMARY:Busy\r\n" in event and "CLASS:PRIVATE\r\n" in event and "RRULE:FREQ=DAILY\r\n" in event
    assert "RRULE:FREQ=DAILY\r\nEXDATE:20190103T100000Z\r\nCLASS:PRIVATE\r\n" in event      # cancellations stay


# --- the event writer's UTF-8 text path ------------------------------------------------------------------------

def random_stored_text(generator):
    """Text as a writer may store it: escapes, controls, line breaks, multi-octet and long runs, escaped
    backslashes, and now and then octets that are not UTF-8 (a truncated sequence, a surrogate, a stray byte)."""
    pieces = ["\\", ";", ",", "\n", "\r", "\r\n", "\t", " ", "\x00", "\x01", "\x07", "\x7f", "a", "\u00e9", "\u6771",
              "\U0001F600", "\u2028", "x" * 70, "\\\\", "\\n", "\\,"]
    raw = "".join(generator.choice(pieces) for _ in range(generator.choice([0, 1, 3, 10, 40, 200]))).encode()
    if generator.random() < 0.2:
        cut = generator.randrange(len(raw) + 1)
        raw = raw[:cut] + generator.choice([b"\xff", b"\xe2\x82", b"\xed\xa0\x80", b"\x80", b"\xc3"]) + raw[cut:]
    return raw


def test_the_utf8_text_path_writes_what_the_text_path_writes():
    """write_event escapes and folds the database's UTF-8 as it is (escape_utf8, fold_utf8); every line must be
    the one text_property writes for the decoded text, invalid octets becoming U+FFFD the same way."""
    generator = random.Random(20261203)
    for _ in range(5000):
        raw = random_stored_text(generator)
        expected = text_property("DESCRIPTION", raw.decode("utf-8", "replace")).encode()
        escaped = timeslot_export.escape_utf8(timeslot_export.valid_utf8(raw))
        assert timeslot_export.fold_utf8(b"DESCRIPTION:" + escaped) + b"\r\n" == expected, raw
        written = timeslot_export.is_written(raw.decode("utf-8", "replace"))
        assert bool(raw.strip(timeslot_export._BLANK_OCTETS)) == written


def test_the_utf8_text_path_treats_every_ascii_octet_as_the_text_path_does():
    """escape_utf8 drops control characters by a table of octets: each octet below 0x80, alone and between
    letters, must come out as escape_text makes the character."""
    for octet in range(0x80):
        for raw in (bytes([octet]), b"a" + bytes([octet]) + b"b", bytes([octet]) * 3 + b",\n"):
            assert timeslot_export.escape_utf8(raw) == escape_text(raw.decode("ascii")).encode(), raw


def test_an_event_is_the_same_from_stored_timestamps_as_from_basic_ones():
    """Slot rows carry timestamps as stored (2019-01-02T10:00:00Z); the writer puts them in basic form."""
    stored = dict(created="2019-01-01T00:00:00Z", updated="2019-01-01T12:30:00Z", start="2019-01-02T10:00:00Z",
                  end="2019-01-02T11:00:00Z", rule="FREQ=DAILY", exdates="2019-01-04T10:00:00Z,2019-01-03T10:00:00Z")
    basic = {name: value.replace("-", "").replace(":", "") for name, value in stored.items()}
    berlin = {"Europe/Berlin": timeslot_export.time_zone("Europe/Berlin")}
    for zone_name, all_day in (("", 0), ("Europe/Berlin", 0), ("", 1)):
        written = [timeslot_export.write_event(slot_row(zone_name=zone_name, all_day=all_day, **fields),
                                               timeslot_export.DEFAULT_STYLE, berlin) for fields in (stored, basic)]
        assert written[0] == written[1]
        assert b"DTSTAMP:20190101T123000Z\r\n" in written[0] and b"EXDATE" in written[0]


def test_the_one_pass_fold_cuts_where_the_exact_one_does():
    """fold_utf8's regex pass (escaped backslashes stood in for) against the piece-by-piece reference, on
    lines dense with escape pairs around every fold point."""
    generator = random.Random(3)
    for _ in range(5000):
        text = "".join(generator.choice(["\\", ";", ",", "a", "\u00e9", "\u20ac", "\n"])
                       for _ in range(generator.randrange(60, 400)))
        for data in (("SUMMARY:" + escape_text(text)).encode(), escape_text(text).encode()):   # any first octet
            assert timeslot_export.fold_utf8(data) == b"\r\n ".join(timeslot_export._pieces_keeping_escapes(data))


def slot_row(title=b"Title", zone_name="", **changes):
    row = dict(uid="u", created="20190101T000000Z", updated="20190101T000000Z", start="20190102T100000Z",
               end="20190102T110000Z", all_day=0, rule="", visibility="public", title=title, description=b"",
               place=None, street=None, postal_code=None, city=None, country=None, latitude=None, longitude=None,
               alerts="15", zone_name=zone_name, exdates=None)
    row.update(changes)
    return tuple(row.values())


def test_the_event_cache_answers_what_the_writer_writes_for_each_style_and_zone():
    cache = timeslot_export.EventCache()
    berlin = timeslot_export.time_zone("Europe/Berlin")
    zones = timeslot_export.CalendarZones({"Europe/Berlin": berlin})
    rows = [slot_row(), slot_row(zone_name="Europe/Berlin"), slot_row(title=b"Other")]
    for style in (timeslot_export.DEFAULT_STYLE, timeslot_export.CalendarStyle(busy=True, alarms=False),
                  timeslot_export.CalendarStyle(alarms=False)):
        fresh = b"".join(timeslot_export.write_calendar([rows], style, zones))
        assert b"".join(timeslot_export.write_calendar([rows], style, zones, cache)) == fresh     # filled
        assert b"".join(timeslot_export.write_calendar([rows], style, zones, cache)) == fresh     # answered
    assert b"SUMMARY:Busy" not in b"".join(timeslot_export.write_calendar([rows], timeslot_export.DEFAULT_STYLE,
                                                                        zones, cache))
    utc = b"".join(timeslot_export.write_calendar([rows], timeslot_export.DEFAULT_STYLE, cache=cache))
    assert b"TZID=Europe/Berlin" not in utc               # the same row without its zone's data: in UTC


def test_the_event_cache_stays_within_its_budget_and_keeps_only_the_first_rows(monkeypatch):
    cache = timeslot_export.EventCache(budget=20_000)
    rows = [slot_row(uid=f"u{n}", description=b"d" * 500) for n in range(200)]
    body = b"".join(timeslot_export.write_calendar([rows], timeslot_export.DEFAULT_STYLE, cache=cache))
    assert body.count(b"BEGIN:VEVENT") == 200
    assert cache._size <= 20_000 and 0 < len(cache._events) < 200
    assert set(key[0] for key in cache._events) == {f"u{n}" for n in range(200 - len(cache._events), 200)}
    monkeypatch.setattr(timeslot_export, "EVENT_CACHE_ROWS", 3)
    cache = timeslot_export.EventCache()
    timeslot_export.write_calendar([rows], timeslot_export.DEFAULT_STYLE, cache=cache).__next__()
    assert sorted(key[0] for key in cache._events) == ["u0", "u1", "u2"]


def test_an_export_after_a_change_shows_the_change_with_the_cache_warm(client, data):
    user_id, token = data.user()
    slot_id, _ = data.slot(user_id, title="Before")
    assert b"SUMMARY:Before" in client.post(EXPORT, headers=auth(token)).body
    # updated_at stays: the cache must not trust a writer to move it (the row itself is the key)
    data.db.execute("UPDATE slots SET title = 'After' WHERE id = ?", (slot_id,))
    data.db.execute("INSERT INTO slot_alerts (slot_id, minutes_before) VALUES (?, 30)", (slot_id,))
    body = client.post(EXPORT, headers=auth(token)).body
    assert b"SUMMARY:After" in body and b"TRIGGER:-PT30M" in body and b"Before" not in body


def test_the_event_cache_keeps_one_event_per_slot_and_style_and_answers_only_its_own_row():
    cache = timeslot_export.EventCache()
    versions = [[slot_row(title=b"One")], [slot_row(title=b"Two")], [slot_row(title=b"One", alerts=None)]]
    for _ in range(3):
        for rows in versions:           # the same uuid, another row each time: written afresh, then replaced
            fresh = b"".join(timeslot_export.write_calendar([rows], timeslot_export.DEFAULT_STYLE))
            assert b"".join(timeslot_export.write_calendar([rows], timeslot_export.DEFAULT_STYLE, cache=cache)) == fresh
    assert len(cache._events) == 1
    assert cache._size == cache._cost(next(iter(cache._events.values()))[2])      # replaced, not added up
