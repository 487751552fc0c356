"""The workload: seeded Faker (``da_DK``) organisations, users, files on disk and scan messages.

``Workload(scenario, data_dir).plan(i)`` writes the files of workload phase
``i`` under ``data_dir`` and returns one ``PlannedScan`` per scan: the scan
spec (or the ConversionMessages, for ``via: conversions``) shaped exactly as
OS2datascanner's (``wire-examples/scan_spec_*.json``, ``conversion_*.json``),
the queue each message goes to, and the objects the scan must produce a
result for. ``PlannedScan.as_event()`` is the history's ``scan_planned``
event.

Determinism: the same scenario and seed give the same organisations, uuids,
scanner pks, scan times, file names, file contents and modification times,
whatever order the phases are planned in (every scan has its own random
stream, derived from the seed, the phase index and the scan index). Only the
absolute paths depend on ``data_dir``.

CPR numbers are built, not taken from Faker (whose ``ssn()`` is not a CPR):
a real date ``DDMMYY``, a seventh digit that agrees with the century, and
three more digits so that the weighted sum (4 3 2 7 6 5 4 3 2 1) is divisible
by 11. Files never contain a blacklisted word of the CPR rule, and files
without a planted CPR never contain a ten-digit number the rule could take
for one.

Delta scans: the rule is ``and(last-modified(after=cutoff), cpr)``. Each
delta scan gets ``phase.objects`` files modified after the cutoff (the
expected objects) and ``phase.old_files`` (default half as many) modified
long before it, which a correct explorer leaves out.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from faker import Faker

from harness.messages import per_scan_queue, scan_id
from harness.scenario import Phase, Scenario

# The real engine's CPR rule as the admin sends it (wire-examples/scan_spec_full.json).
BLACKLIST = [
    "ordrenummer", "order number", "p-nr", "fakturanummer", "faknr", "fak-nr", r"protocol no\.",
    "customer no", "test report no", "dhk:tx", "bilagsnummer", "customer-no", "tullstatistik",
    "tullstatistisk", "pnr", r"p\.nr", "p-nummer",
]
_BLACKLIST_RE = re.compile("|".join(BLACKLIST), re.IGNORECASE)

# What the engine's CPR regex would pick up: DDMMYY, an optional separator, SSSS.
CPR_LIKE = re.compile(r"\d{2}\s?\d{2}\s?\d{2}(?:[\s\-/.]|\s-\s)?\d{4}")

CPR_WEIGHTS = (4, 3, 2, 7, 6, 5, 4, 3, 2, 1)

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # last-modified "after", as the engine parses it
DANISH_TZ = timezone(timedelta(hours=1))


def cpr_rule() -> dict[str, Any]:
    return {
        "type": "cpr",
        "sensitivity": 1000,
        "name": "CPR-regel",
        "modulus_11": True,
        "ignore_irrelevant": True,
        "examine_context": True,
        "whitelist": ["cpr"],
        "blacklist": list(BLACKLIST),
        "exceptions": "",
        "surrounding_exceptions": "",
    }


def delta_rule(cutoff: str) -> dict[str, Any]:
    return {
        "type": "and",
        "sensitivity": None,
        "name": None,
        "components": [
            {"type": "last-modified", "sensitivity": None, "name": None, "after": cutoff},
            cpr_rule(),
        ],
    }


# --- CPR numbers -----------------------------------------------------------------

def _century_digits(year: int) -> list[int]:
    """The seventh digits that place a two-digit year in ``year``'s century."""
    yy = year % 100
    if 1900 <= year <= 1999:
        digits = [0, 1, 2, 3]
        if yy >= 37:
            digits += [4, 9]
        return digits
    if 2000 <= year <= 2036:
        return [4, 9] + [5, 6, 7, 8]
    if 2037 <= year <= 2057:
        return [5, 6, 7, 8]
    if 1858 <= year <= 1899:
        return [5, 6, 7, 8]
    raise ValueError(f"no CPR century digit for {year}")


def century_of(cpr: str) -> int:
    """The birth year's century implied by a CPR's seventh digit (inverse of ``_century_digits``)."""
    yy, d7 = int(cpr[4:6]), int(cpr[6])
    if d7 <= 3:
        return 1900
    if d7 in (4, 9):
        return 1900 if yy >= 37 else 2000
    return 1800 if yy >= 58 else 2000


def is_valid_cpr(cpr: str) -> bool:
    """Ten digits, a real date in the century the seventh digit says, modulus 11."""
    digits = cpr.replace("-", "")
    if not re.fullmatch(r"\d{10}", digits):
        return False
    try:
        date(century_of(digits) + int(digits[4:6]), int(digits[2:4]), int(digits[0:2]))
    except ValueError:
        return False
    return sum(int(d) * w for d, w in zip(digits, CPR_WEIGHTS)) % 11 == 0


def make_cpr(rng: random.Random, born: date | None = None) -> str:
    """A valid CPR number (10 digits, no dash) for a birth date between 1940 and 2006."""
    if born is None:
        # 1 January is avoided: engines treat 010101-style placeholders specially.
        start = date(1940, 1, 2).toordinal()
        born = date.fromordinal(rng.randint(start, date(2006, 12, 31).toordinal()))
    head = born.strftime("%d%m%y")
    while True:
        d7 = rng.choice(_century_digits(born.year))
        d8, d9 = rng.randrange(10), rng.randrange(10)
        partial = head + f"{d7}{d8}{d9}"
        rest = sum(int(d) * w for d, w in zip(partial, CPR_WEIGHTS[:9])) % 11
        last = (11 - rest) % 11
        if last < 10:
            return partial + str(last)


# --- text ------------------------------------------------------------------------

class TextPool:
    """Faker fragments made once per workload; files are composed from them with a per-scan rng."""

    def __init__(self, faker: Faker, size: int = 300):
        def clean(values: list[str]) -> list[str]:
            ok = [v for v in values if not _BLACKLIST_RE.search(v) and not CPR_LIKE.search(v)]
            return ok or ["Intet at bemærke."]

        self.sentences = clean([faker.sentence(nb_words=10) for _ in range(size * 2)])
        self.names = clean([faker.name() for _ in range(size)])
        self.addresses = clean([faker.address().replace("\n", ", ") for _ in range(size)])
        self.companies = clean([faker.company() for _ in range(size // 3)])
        self.jobs = clean([faker.job() for _ in range(size // 3)])
        self.cities = clean([faker.city() for _ in range(size // 3)])

    def paragraph(self, rng: random.Random, sentences: int) -> str:
        return " ".join(rng.choice(self.sentences) for _ in range(sentences))


DOC_KINDS = ("Notat", "Referat", "Ansøgning", "Afgørelse", "Journalnotat", "Brev", "Aktindsigt")
MONTHS = ("januar", "februar", "marts", "april", "maj", "juni", "juli", "august", "september",
          "oktober", "november", "december")
CPR_LINES = (
    "Vedrørende {name}, CPR-nr. {cpr}, bosat {address}.",
    "Borgerens cpr: {cpr} ({name}).",
    "{name} med CPR {cpr} har henvendt sig om sagen.",
    "Personnummer for {name}: {cpr}, adresse {address}.",
)


def _format_cpr(rng: random.Random, cpr: str) -> str:
    return cpr[:6] + "-" + cpr[6:] if rng.random() < 0.7 else cpr


def compose_document(pool: TextPool, rng: random.Random, cprs: list[str], author: str) -> str:
    """A realistic Danish case document; ``cprs`` are planted in sentences that name a person."""
    day = rng.randint(1, 28)
    lines = [
        f"{rng.choice(DOC_KINDS)} – {rng.choice(pool.companies)}",
        f"Dato: {day}. {rng.choice(MONTHS)} {rng.randint(2015, 2026)}",
        f"Sagsbehandler: {author}, {rng.choice(pool.jobs)}",
        "",
        pool.paragraph(rng, rng.randint(2, 5)),
        "",
    ]
    body = [pool.paragraph(rng, rng.randint(2, 6)) for _ in range(rng.randint(1, 4))]
    for cpr in cprs:
        line = rng.choice(CPR_LINES).format(
            name=rng.choice(pool.names), cpr=_format_cpr(rng, cpr), address=rng.choice(pool.addresses))
        body.insert(rng.randint(0, len(body)), line)
    if rng.random() < 0.5:
        body.append(f"Kontakt: {rng.choice(pool.names)}, {rng.choice(pool.addresses)}.")
    lines += body
    lines += ["", f"Med venlig hilsen {author}", rng.choice(pool.cities), ""]
    text = "\n".join(lines)
    if not cprs:
        # Belt and braces: nothing in a negative file may look like a CPR.
        text = CPR_LIKE.sub(lambda m: re.sub(r"\d", "x", m.group(0)), text)
    return text


# --- the plan --------------------------------------------------------------------

@dataclass
class Organisation:
    client: str
    name: str
    uuid: str
    users: list[str]
    admin: str


@dataclass
class PlannedScan:
    """One scan run of one phase: what to publish and what the engine must produce."""

    scan: str  # harness.messages.scan_id of the tag
    client: str
    org: str  # organisation uuid
    mode: str  # 'full' | 'delta'
    explorer_queue: str
    conversion_queue: str
    objects: list[str]  # relative paths that must yield a result (delta: modified after the cutoff)
    via: str  # 'explorer' | 'conversions'
    messages: list[tuple[str, dict[str, Any]]]  # (queue, message body) in publishing order
    spec: dict[str, Any] = field(repr=False)
    source_dir: Path = field(repr=False)
    phase: int = 0
    cpr_objects: list[str] = field(default_factory=list)  # objects with at least one planted CPR
    old_objects: list[str] = field(default_factory=list)  # delta: files before the cutoff (no result expected)
    cutoff: str | None = None  # delta: the last-modified "after" value
    per_scan: str | None = None  # the tag its per-scan queue (conversion_queue) is announced with, or None

    def as_event(self) -> dict[str, Any]:
        """Fields of the history's ``scan_planned`` event."""
        return {
            "scan": self.scan,
            "client": self.client,
            "org": self.org,
            "mode": self.mode,
            "explorer_queue": self.explorer_queue,
            "conversion_queue": self.conversion_queue,
            "objects": list(self.objects),
            "via": self.via,
            "per_scan": self.per_scan,
        }


class Workload:
    """Seeded generator of organisations, files and scan messages for a scenario."""

    # Scan times are fixed (not "now") so that the same seed gives the same messages.
    BASE_TIME = datetime(2026, 1, 5, 7, 0, 0, tzinfo=timezone.utc)
    CUTOFF_BASE = datetime(2025, 1, 1, 0, 0, 0, tzinfo=DANISH_TZ)

    def __init__(self, scenario: Scenario, data_dir: Path | str):
        self.scenario = scenario
        self.seed = scenario.seed
        self.data_dir = Path(data_dir).resolve()
        faker = Faker("da_DK")
        faker.seed_instance(self.seed)
        self.organisations: dict[str, Organisation] = {}
        for index, client in enumerate(scenario.clients):
            self.organisations[client.name] = self._organisation(faker, client.name, client.organisation)
        self.pool = TextPool(faker)
        self.scanner_pks = {
            (client.name, mode): 100 * (index + 1) + offset
            for index, client in enumerate(scenario.clients)
            for mode, offset in (("full", 1), ("delta", 2))
        }

    def _organisation(self, faker: Faker, client: str, name: str | None) -> Organisation:
        rng = random.Random(f"{self.seed}/org/{client}")
        faker.seed_instance(f"{self.seed}/org/{client}")
        users = sorted({faker.user_name() for _ in range(4)})
        return Organisation(
            client=client,
            name=name or faker.company(),
            uuid=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            users=users,
            admin=users[0],
        )

    # The public API -------------------------------------------------------------

    def plan(self, phase_index: int) -> list[PlannedScan]:
        """Write the files of one phase and return its scans, in publishing order."""
        phase = self.scenario.workload[phase_index]
        return [self._plan_scan(phase_index, phase, number) for number in range(phase.scans)]

    def plan_scan(self, phase_index: int, number: int, objects: int | None = None,
                  conversion_queue: str | None = None) -> PlannedScan:
        """One more scan of a phase, numbered ``number`` (for holds, lasting backlogs and calibration).

        ``objects`` overrides the phase's count (a hold of conversions publishes one scan per top-up);
        ``conversion_queue`` the per-scan queue (a per-scan hold of conversions keeps one queue filled)."""
        phase = self.scenario.workload[phase_index]
        if objects is not None:
            phase = phase.model_copy(update={"objects": objects})
        return self._plan_scan(phase_index, phase, number, conversion_queue)

    def per_scan_queue(self, phase_index: int, number: int) -> str | None:
        """The per-scan queue scan ``number`` of a phase gets, or None when the phase is not routed per scan."""
        phase = self.scenario.workload[phase_index]
        if self.scenario.per_scan_tag(phase) is None:
            return None
        scan_time, _ = self._times(random.Random(self._scan_seed(phase_index, number)), phase_index, number)
        client = self.scenario.client(phase.client)
        return per_scan_queue({"time": scan_time.isoformat(), "scanner": {"pk": self.scanner_pks[(client.name, phase.mode)]}})

    def plan_all(self) -> list[list[PlannedScan]]:
        return [self.plan(index) for index in range(len(self.scenario.workload))]

    # Internals ------------------------------------------------------------------

    def _scan_seed(self, phase_index: int, number: int) -> str:
        return f"{self.seed}/scan/{phase_index}/{number}"

    def _times(self, rng: random.Random, phase_index: int, number: int) -> tuple[datetime, datetime]:
        """A scan's time and its delta cutoff; the first draws of the scan's own random stream.

        One day per phase, one minute per scan; scans past a day's worth (holds) move 1000 days on,
        so that two phases of one client and mode never share a scan time (the scan's identity, and
        to the second the name of its per-scan queue)."""
        days = phase_index + 1000 * (number // 1440)
        scan_time = self.BASE_TIME + timedelta(
            days=days, minutes=number % 1440, seconds=rng.randint(0, 59), microseconds=rng.randint(1, 999_999))
        return scan_time, self.CUTOFF_BASE + timedelta(days=days, minutes=number % 1440)

    @staticmethod
    def _choose_files(rng: random.Random, phase: Phase, delta: bool) -> tuple[list[str], list[int], list[int], set[int]]:
        """The scan's file names, which are recent (expected), which old (before a delta's cutoff), and
        which carry CPR numbers (old files too: a wrong explorer that scans them would find them)."""
        n_old = 0
        if delta:
            n_old = phase.old_files if phase.old_files is not None else phase.objects // 2
        total = phase.objects + n_old
        names = [f"doc{i:05d}.txt" for i in range(total)]
        # Which files are recent (expected) and which are old, shuffled so order does not tell.
        order = list(range(total))
        rng.shuffle(order)
        expected_idx = sorted(order[: phase.objects])
        old_idx = sorted(order[phase.objects:])
        n_cpr = round(phase.objects * phase.cpr_share)
        cpr_idx = set(rng.sample(expected_idx, n_cpr))
        cpr_idx |= set(rng.sample(old_idx, round(len(old_idx) * phase.cpr_share)))
        return names, expected_idx, old_idx, cpr_idx

    def _write_files(self, rng: random.Random, source_dir: Path, names: list[str], cpr_idx: set[int],
                     old_set: set[int], delta: bool, cutoff_dt) -> None:
        """Write the documents, with modification times before or after the cutoff as chosen."""
        for i, name in enumerate(names):
            cprs = [make_cpr(rng) for _ in range(rng.randint(1, 3))] if i in cpr_idx else []
            text = compose_document(self.pool, rng, cprs, rng.choice(self.pool.names))
            path = source_dir / name
            path.write_text(text, encoding="utf-8")
            if delta and i in old_set:
                mtime = cutoff_dt - timedelta(days=rng.uniform(30, 1000))
            elif delta:
                mtime = cutoff_dt + timedelta(hours=rng.uniform(2, 24 * 300))
            else:
                mtime = cutoff_dt + timedelta(days=rng.uniform(-1000, 300))
            stamp = mtime.timestamp()
            os.utime(path, (stamp, stamp))

    def _plan_scan(self, phase_index: int, phase: Phase, number: int,
                   per_scan_queue_name: str | None = None) -> PlannedScan:
        rng = random.Random(self._scan_seed(phase_index, number))
        client = self.scenario.client(phase.client)
        org = self.organisations[client.name]
        delta = phase.mode == "delta"
        explorer_queue = client.explorer_delta_queue if delta else client.explorer_full_queue
        conversion_queue = client.conversion_delta_queue if delta else client.conversion_full_queue

        source_dir = self.data_dir / client.name / f"p{phase_index:02d}-{phase.mode}-s{number:04d}"
        if source_dir.exists():
            shutil.rmtree(source_dir)
        source_dir.mkdir(parents=True)

        scan_time, cutoff_dt = self._times(rng, phase_index, number)
        cutoff = cutoff_dt.strftime(TIME_FORMAT) if delta else None

        names, expected_idx, old_idx, cpr_idx = self._choose_files(rng, phase, delta)
        self._write_files(rng, source_dir, names, cpr_idx, set(old_idx), delta, cutoff_dt)

        source = {"type": "file", "path": str(source_dir)}
        spec = {
            "scan_tag": {
                "time": scan_time.isoformat(),
                "user": org.admin,
                "scanner": {
                    "pk": self.scanner_pks[(client.name, phase.mode)],
                    "name": f"{'Deltascan' if delta else 'Fuld scan'} {org.name}",
                    "test": False,
                    "keep_fp": False,
                },
                "organisation": {"name": org.name, "uuid": org.uuid},
                "destination": "pipeline_collector",
            },
            "source": source,
            "rule": delta_rule(cutoff) if delta else cpr_rule(),
            "configuration": {"skip_mime_types": ["image/*"]},
            "filter_rule": None,
            "progress": None,
            "explorer_queue": explorer_queue,
            "conversion_queue": conversion_queue,
        }
        tag = self.scenario.per_scan_tag(phase)
        if tag is not None:
            # Named as the admin names it; a per-scan hold of conversions keeps its first scan's queue.
            spec["conversion_queue"] = conversion_queue = per_scan_queue_name or per_scan_queue(spec["scan_tag"])
        objects = [names[i] for i in expected_idx]
        if phase.via == "conversions":
            messages = [(conversion_queue, conversion_message(spec, name)) for name in objects]
        else:
            messages = [(explorer_queue, spec)]
        return PlannedScan(
            scan=scan_id(spec["scan_tag"]),
            client=client.name,
            org=org.uuid,
            mode=phase.mode,
            explorer_queue=explorer_queue,
            conversion_queue=conversion_queue,
            objects=objects,
            via=phase.via,
            messages=messages,
            spec=spec,
            source_dir=source_dir,
            phase=phase_index,
            cpr_objects=[names[i] for i in expected_idx if i in cpr_idx],
            old_objects=[names[i] for i in old_idx],
            cutoff=cutoff,
            per_scan=tag,
        )


def conversion_message(spec: dict[str, Any], relative_path: str) -> dict[str, Any]:
    """A ConversionMessage for one object of ``spec``, as the explorer sends it."""
    return {
        "scan_spec": spec,
        "handle": {"type": "file", "source": spec["source"], "path": relative_path, "hints": None},
        "progress": {"rule": spec["rule"], "matches": []},  # shared, not copied: treat as read-only
    }
