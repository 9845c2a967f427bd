"""A small RFC 5545 reader for the tests, written apart from the module: it reads the service's output the
way a client does, so the tests can compare what a client would show with what zoneinfo says.

- Components and properties from unfolded content lines (§3.1, §3.4-§3.6).
- VTIMEZONE (§3.6.5): each STANDARD/DAYLIGHT sub-component's onsets, from its RRULE (FREQ=YEARLY with
  BYMONTH, BYDAY, BYMONTHDAY, BYYEARDAY) or its RDATEs, else its DTSTART. Like ical.js (Thunderbird), a
  DTSTART does not count beside an RRULE or RDATE and an RDATE is read one value per property, so output
  that relies on either would give wrong offsets here; rule forms ical.js refuses or loops on fail. The
  latest onset at or before an instant wins.
- Local times to UTC (§3.3.5): the first of a repeated hour, the offset from before a gap.
- Event recurrence (§3.3.10) for what the tests write: FREQ=DAILY or WEEKLY with UNTIL or COUNT, EXDATE.
"""

import bisect
import calendar
import datetime

UTC = datetime.timezone.utc
EPOCH = datetime.datetime(1970, 1, 1)
WEEKDAYS = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]


class Component:
    def __init__(self, name):
        self.name = name
        self.properties = []        # (name, parameters, value)
        self.children = []

    def all(self, name):
        return [(parameters, value) for key, parameters, value in self.properties if key == name]

    def one(self, name):
        (found,) = self.all(name)
        return found

    def value(self, name, default=None):
        found = self.all(name)
        return found[0][1] if found else default

    def find(self, name):
        return [child for child in self.children if child.name == name]


def parse(body):
    """The VCALENDAR component of a calendar body (bytes or str)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    assert text.endswith("\r\n")
    stack = [Component("document")]
    for line in text.replace("\r\n ", "").split("\r\n")[:-1]:
        head, _, value = line.partition(":")
        name, *parameters = head.split(";")
        parameters = dict(parameter.split("=", 1) for parameter in parameters)
        if name == "BEGIN":
            child = Component(value)
            stack[-1].children.append(child)
            stack.append(child)
        elif name == "END":
            assert stack.pop().name == value
        else:
            stack[-1].properties.append((name, parameters, value))
    (calendar_component,) = stack[0].children
    return calendar_component


def seconds(local_datetime):
    """A naive datetime as seconds since 1970 (of whatever clock it is on)."""
    return round((local_datetime - EPOCH).total_seconds())


def date_time(text):
    """(naive datetime, is UTC) of a DATE-TIME value."""
    return datetime.datetime.strptime(text.rstrip("Z"), "%Y%m%dT%H%M%S"), text.endswith("Z")


def utc_offset(text):
    sign = -1 if text[0] == "-" else 1
    hours, minutes, secs = int(text[1:3]), int(text[3:5]), int(text[5:7] or 0)
    return sign * (hours * 3600 + minutes * 60 + secs)


def rule_parts(text):
    return dict(part.split("=", 1) for part in text.split(";"))


def _yearly_days(parts, year):
    """The dates a FREQ=YEARLY rule of a VTIMEZONE gives in ``year``."""
    known = {"FREQ", "BYMONTH", "BYDAY", "BYMONTHDAY", "BYYEARDAY"}
    assert set(parts) <= known and parts["FREQ"] == "YEARLY", parts
    # ical.js (Thunderbird) throws on BYYEARDAY beside another BY part, and loops forever on a negative
    # BYMONTHDAY beside BYDAY: output a client cannot read is wrong output.
    assert "BYYEARDAY" not in parts or set(parts) == {"FREQ", "BYYEARDAY"}, parts
    assert "BYDAY" not in parts or "-" not in parts.get("BYMONTHDAY", ""), parts
    weekday = None
    ordinal = None
    if "BYDAY" in parts:
        day = parts["BYDAY"]
        assert "," not in day
        weekday = WEEKDAYS.index(day[-2:])
        ordinal = int(day[:-2]) if day[:-2] else None
    if "BYYEARDAY" in parts:
        assert ordinal is None and "BYMONTH" not in parts
        length = 366 if calendar.isleap(year) else 365
        days = []
        for number in map(int, parts["BYYEARDAY"].split(",")):
            index = number - 1 if number > 0 else length + number
            days.append(datetime.date(year, 1, 1) + datetime.timedelta(days=index))
    else:
        days = []
        for month in map(int, parts["BYMONTH"].split(",")):
            length = calendar.monthrange(year, month)[1]
            month_days = [datetime.date(year, month, number) for number in range(1, length + 1)]
            if "BYMONTHDAY" in parts:
                wanted = [int(number) for number in parts["BYMONTHDAY"].split(",")]
                month_days = [day for day in month_days if day.day in wanted or day.day - length - 1 in wanted]
            if weekday is not None:
                month_days = [day for day in month_days if day.weekday() == weekday]
            if ordinal is not None:
                month_days = [month_days[ordinal - 1 if ordinal > 0 else ordinal]]
            days += month_days
    if weekday is not None:
        days = [day for day in days if day.weekday() == weekday]
    return sorted(days)


class Zone:
    """The offsets one VTIMEZONE gives, onsets expanded through ``last_year``."""

    def __init__(self, component, last_year=2100):
        self.name = component.value("TZID")
        onsets = []
        for observance in component.children:
            assert observance.name in ("STANDARD", "DAYLIGHT")
            start, is_utc = date_time(observance.value("DTSTART"))
            assert not is_utc
            before = utc_offset(observance.value("TZOFFSETFROM"))
            after = utc_offset(observance.value("TZOFFSETTO"))
            rules = observance.all("RRULE")
            rdates = [value for _, value in observance.all("RDATE")]
            assert len(rules) <= 1 and not (rules and rdates)
            if rules:
                parts = rule_parts(rules[0][1])
                assert "UNTIL" not in parts and "COUNT" not in parts
                locals_ = [datetime.datetime.combine(day, start.time())
                           for year in range(start.year, last_year + 1) for day in _yearly_days(parts, year)]
                locals_ = [local for local in locals_ if local >= start]
            elif rdates:
                assert all("," not in value for value in rdates), "ical.js reads only an RDATE's first value"
                locals_ = [date_time(value)[0] for value in rdates]
            else:
                locals_ = [start]
            onsets += [(seconds(local) - before, after, observance) for local in locals_]
        onsets.sort(key=lambda onset: onset[0])
        self.onsets = [onset[0] for onset in onsets]
        self.offsets = [onset[1] for onset in onsets]
        self.observances = [onset[2] for onset in onsets]

    def offset_at(self, instant):
        index = bisect.bisect_right(self.onsets, instant) - 1
        assert index >= 0, f"{self.name}: no onset at or before {instant}"
        return self.offsets[index]

    def to_utc(self, local):
        """UTC seconds for a wall-clock time (seconds): the first of a repeated hour; in a gap, the
        offset from before it."""
        named = [local - offset for offset in set(self.offsets) if self.offset_at(local - offset) == offset]
        if named:
            return min(named)
        return local - self.offset_at(local - max(self.offsets) - 1)


def zones(calendar_component, last_year=2100):
    return {zone.name: zone for zone in (Zone(component, last_year)
                                         for component in calendar_component.find("VTIMEZONE"))}


def instant(parameters, value, known_zones):
    """UTC seconds of a DTSTART/DTEND/EXDATE value (a DATE counts as 00:00 UTC)."""
    if parameters.get("VALUE") == "DATE":
        return seconds(datetime.datetime.strptime(value, "%Y%m%d"))
    local, is_utc = date_time(value)
    if is_utc:
        assert "TZID" not in parameters
        return seconds(local)
    return known_zones[parameters["TZID"]].to_utc(seconds(local))


def occurrences(event, known_zones, limit=5000):
    """The UTC starts (seconds) of an event's occurrences, with its RRULE (DAILY/WEEKLY) and EXDATEs."""
    parameters, value = event.one("DTSTART")
    start = instant(parameters, value, known_zones)
    rules = event.all("RRULE")
    if not rules:
        return [start]
    parts = rule_parts(rules[0][1])
    assert set(parts) <= {"FREQ", "UNTIL", "COUNT", "INTERVAL"}, parts
    step = {"DAILY": 1, "WEEKLY": 7}[parts["FREQ"]] * int(parts.get("INTERVAL", 1))
    until = None
    if "UNTIL" in parts:
        until_time, until_is_utc = date_time(parts["UNTIL"])
        assert until_is_utc or parameters.get("VALUE") == "DATE"
        until = seconds(until_time)
    count = int(parts.get("COUNT", limit))
    local, _ = date_time(value) if parameters.get("VALUE") != "DATE" else (
        datetime.datetime.strptime(value, "%Y%m%d"), False)
    found = []
    for number in range(min(count, limit)):
        wall = local + datetime.timedelta(days=step * number)
        text = wall.strftime("%Y%m%dT%H%M%S") + ("Z" if value.endswith("Z") else "")
        if parameters.get("VALUE") == "DATE":
            text = wall.strftime("%Y%m%d")
        at = instant(parameters, text, known_zones)
        if until is not None and at > until:
            break
        found.append(at)
    cancelled = set()
    for exdate_parameters, values in event.all("EXDATE"):
        cancelled.update(instant(exdate_parameters, item, known_zones) for item in values.split(","))
    return [at for at in found if at not in cancelled]
