#!/usr/bin/env python3
"""A discrete-event simulation of one ad account's pace: the emulator's sliding-window budget
(tests/src/emulator/limits.rs), a fleet of upload tasks (worker::upload: reserve a slot, check
the fleet-wide pause, call, feed the answer's usage back, defer a throttled shard past its
pause) and the controller (worker::budget's RESERVE and OBSERVE scripts, transcribed: keep
`InFlightGate` in step with them).

Why it exists: one `ae-bench ratelimit` run takes a minute and shows one trajectory; this runs
the same scenario (budget steady, halved, doubled once half the shards are done) in seconds,
so a change to the controller can be tried on many seeds and windows before it is written in
Lua. It is a design aid, not a test: nothing in CI runs it.

How faithful (SlopeOnly, then InFlightGate, against `ae-bench ratelimit` on the real fleet):
steady 10 s window (`--shards 600 --window-secs 10 --workers 4`): 90% / 89% of R, real 88-89%;
halved 10 s: 18-32 / 10-11 throttled of ~620, real 19-25 / 11; steady 5 s window: 140 / 3
throttled, real 154 / 0; halved 5 s: 121 / 33, real 126 / 38. Less faithful with a 30 s window:
one worker, halved, SlopeOnly gives 1.13-1.14 of the oracle where the real fleet measured 1.02,
and with four workers the sim's oracle takes every remaining call at once where the real run's
did not. LeaveFloor against the fleet: R = 100, 30 s window, 3,000 × 4 halved, 1.10-1.14 of the
oracle and 32-33 throttled, real 1.10 and 31; 10 s halved 11-12 throttled at 1.07-1.08, real 12
at 1.06. KnownWindow against the fleet: 2,000 × 4, 30 s window, halved: 13 of 2,013 throttled at
1.04-1.05 of the oracle, real 11 of 2,012 at 1.04; 600 × 4, 10 s, halved: 6 of 606 at 1.11,
real 8 of 609 at 1.08; R = 100, 3,000 × 4, halved: 23-24 of ~3,024 at 1.03-1.05, real 24 at
1.12. NetOfLeaving against the fleet: 600 × 4, 10 s: steady 97% of R, real 96%; halved 5 of
605 at 1.04, real 5 of 606 at 1.02. Check any conclusion on the real fleet.

Usage: python3 docs/pace-sim/pace_sim.py [net-of-leaving|known-window|leave-floor|inflight-gate|slope-only] [--seeds N]
"""
import argparse
import bisect
import heapq
import math
import random
from collections import deque


class Window:
    """The emulator's rule: a call is taken while fewer than `budget` calls of the last
    `window` seconds were; usage = floor(100 × counted / budget); refused calls are not
    counted; `reset` = whole seconds until the oldest counted call leaves."""

    def __init__(self, budget, window):
        self.budget, self.window = budget, window
        self.recent = deque()
        self.calls = self.throttled = 0
        self.log = []  # (time, taken)

    def charge(self, now):
        while self.recent and now - self.recent[0] >= self.window:
            self.recent.popleft()
        used = len(self.recent)
        self.calls += 1
        reset = int(self.window - (now - self.recent[0])) if self.recent else 0
        if used >= self.budget:
            self.throttled += 1
            self.log.append((now, False))
            return False, used * 100 // self.budget, reset
        self.recent.append(now)
        self.log.append((now, True))
        return True, (used + 1) * 100 // self.budget, reset


def oracle(before, rest, change, budget, window):
    """ae-bench's budget_oracle: when the last of `rest` calls could go at the earliest."""
    counted = deque(t for t in before if change - t < window)
    t = change
    for _ in range(rest):
        while True:
            while counted and t - counted[0] >= window:
                counted.popleft()
            if len(counted) < max(budget, 1):
                break
            t = counted[0] + window + 1e-9
        counted.append(t)
    return t - change


class SlopeOnly:
    """worker::budget as of commit 0986249 (RESERVE and OBSERVE, same constants): the pace
    steered by the last usage and its slope alone."""

    H_MIN, TAU, DOUBLING, GROWTH, SMOOTH, HORIZON = 0.05, 1.0, 1.0, 5.0, 0.5, 0.05

    def __init__(self, start, mx=200, target=96, band=16, probe=0.5, longest=60.0):
        self.start, self.mx, self.target, self.band = start, mx, target, band
        self.probe, self.longest = probe, longest
        self.base, self.u, self.slope, self.uref = start, 0, 0.0, None
        self.tu = self.tg = None
        self.k, self.until, self.tat = 0, 0.0, 0.0

    def predicted(self, now):
        return self.u + max(self.slope, 0) * self.TAU

    def reserve(self, now):
        """('ok', wait, ticket) or ('later', wait)."""
        h = min(1, max(self.H_MIN, (self.target - self.predicted(now)) / self.band))
        tat = max(self.tat, now)
        if tat - now > self.HORIZON:
            return ("later", tat - now - self.HORIZON)
        self.tat = tat + 1 / (self.base * h)
        return ("ok", tat - now, 0)

    def observe(self, now, u, throttled, reset, ticket):
        """The pause the account needs now (s; 0: none)."""
        self.tu = now if self.tu is None else self.tu
        self.tg = now if self.tg is None else self.tg
        pause = 0
        if throttled:
            if now >= self.until:
                self.k += 1
                pause = max(min(self.probe * 2 ** (self.k - 1), self.longest), reset)
                self.until = now + pause
            else:
                pause = self.until - now
            u = max(u, 100)
        else:
            self.uref = u if self.uref is None else self.uref
            dt = now - self.tu
            if dt >= 0.05:
                a = min(dt / self.SMOOTH, 1)
                self.slope = (1 - a) * self.slope + a * (u - self.uref) / dt
                self.tu, self.uref = now, u
            self.k = 0
            if u >= 100:
                pause = max(self.probe, reset, self.until - now)
                self.until = now + pause
            elif u + max(self.slope, 0) * self.GROWTH < self.target - self.band:
                since = min(now - self.tg, self.DOUBLING)
                self.base = min(self.mx, self.base * 2 ** (since / self.DOUBLING))
        self.tg, self.u = now, u
        return pause


class InFlightGate(SlopeOnly):
    """worker::budget since 2026-12-04 (figures in BENCHMARKS.md): SlopeOnly plus the calls on
    the wire. Reservations are numbered (the ticket an answer carries back); the freshest reading plus the calls
    reserved after it, at a learned cost per call (percent), predicts the usage, and no slot is
    booked that would take it past the target (one probe when the reading is stale). The cost
    is learned from the rise in usage between readings ≥ 4 points apart (smoothed; it
    underestimates while calls leave the window) and scaled up at once when a reading jumps
    above the prediction (a budget cut). The base grows only while the usage, at its slope,
    stays under the band for 10 s (5 s in SlopeOnly)."""

    STALE, NEAR, MIN_DU, SMOOTH_COST, GROWTH = 1.0, 0.25, 4, 0.5, 10.0

    def __init__(self, start, **kw):
        super().__init__(start, **kw)
        self.n = self.nr = 0
        self.ur, self.tr, self.c = 0, 0.0, 0.0
        self.anchor = None

    def predicted(self, now):
        if self.c == 0:
            return super().predicted(now)
        return self.ur + (self.n - self.nr) * self.c

    def reserve(self, now):
        p = self.predicted(now)
        if self.c > 0 and p + self.c > self.target:
            stale = self.NEAR if p + self.c <= 99.5 else self.STALE
            if now - self.tr < stale:
                return ("later", 0.01)
            self.tr = now
        r = super().reserve(now)
        if r[0] == "ok":
            self.n += 1
            return ("ok", r[1], self.n)
        return r

    def observe(self, now, u, throttled, reset, ticket):
        jumped = self.jumped = False
        if ticket > self.nr:
            expected = self.ur + (ticket - self.nr) * self.c
            if self.c > 0 and expected > 0 and u > expected + 1:
                self.c *= u / expected  # a jump: the budget shrank (or others spend it)
                jumped = self.jumped = True
            self.nr, self.ur, self.tr = ticket, (max(u, 100) if throttled else u), now
        if not throttled:
            if self.anchor is None or u < self.anchor[1] or jumped:
                self.anchor = (ticket, u)
            elif ticket > self.anchor[0] and u - self.anchor[1] >= self.MIN_DU:
                calls = self.calls_between(self.anchor[0], ticket)
                if calls > 0:
                    sample = (u - self.anchor[1]) / calls
                    w = self.SMOOTH_COST if self.c else 1
                    self.c = (1 - w) * self.c + w * sample
                self.anchor = (ticket, u)
        return super().observe(now, u, throttled, reset, ticket)

    def calls_between(self, a, b):
        """The calls a rise in usage from ticket `a`'s reading to ticket `b`'s is read over."""
        return b - a


class LeaveFloor(InFlightGate):
    """worker::budget since 2026-12-04 evening: InFlightGate, but the gate closes at a ceiling
    (99%: a reading of 99 may be a window one call short of full) rather than at the target, and
    the pace never goes below the rate calls leave the window, measured between readings ≥ 1 s
    apart as the calls sent less the rise in usage (in calls), smoothed. Between the target and
    the ceiling the fleet so sends about as fast as the window frees, where InFlightGate sent
    one probe every 0.25 s (1.60 of the oracle with R = 100 and a 30 s window, halved)."""

    CEIL, LEAVE_SPAN, LEAVE_SMOOTH = 99.0, 1.0, 0.5

    def __init__(self, start, **kw):
        super().__init__(start, **kw)
        self.leave = 0.0
        self.la = None  # the leave rate's anchor reading: (time, ticket, usage)

    def reserve(self, now):
        p = self.predicted(now)
        probe = False
        if self.c > 0 and p + self.c > self.CEIL:
            if now - self.tr < self.STALE:
                return ("later", 0.01)
            probe = True
        h = min(1, max(self.H_MIN, (self.target - p) / self.band))
        rate = self.rate(now, h)
        tat = max(self.tat, now)
        if tat - now > self.HORIZON:
            return ("later", tat - now - self.HORIZON)
        self.tat = tat + 1 / rate
        self.n += 1
        if probe:
            self.tr = now
        return ("ok", tat - now, self.n)

    def rate(self, now, h):
        """The slot rate: `base × h`, or the rate calls leave the window if faster."""
        return max(self.base * h, self.leave)

    def observe(self, now, u, throttled, reset, ticket):
        pause = super().observe(now, u, throttled, reset, ticket)
        if not throttled and ticket > 0 and self.c > 0:
            if self.la is None or self.jumped:
                self.la = (now, ticket, u)
            elif ticket > self.la[1] and now - self.la[0] >= self.LEAVE_SPAN:
                left = max((ticket - self.la[1]) - (u - self.la[2]) / self.c, 0)
                sample = left / (now - self.la[0])
                self.leave = min(self.mx, (1 - self.LEAVE_SMOOTH) * self.leave + self.LEAVE_SMOOTH * sample)
                self.la = (now, ticket, u)
        return pause


class KnownWindow(LeaveFloor):
    """worker::budget since 2026-12-04 night: LeaveFloor, with Meta's window known (a setting;
    an hour on Meta). The fleet's own calls (reservation times) are read against each usage:
    the calls of one window before the answered call, scaled to a full window
    (count / window × 100 / usage), are the rate the budget sustains, and `base × h` goes at most
    10% above it (the window fills evenly instead of in a burst that comes back every window);
    the pace never goes below the rate the fleet's calls of one window ago leave now (counted
    over 0.5 s ahead); and a throttled answer pauses the account until enough of the window's
    calls have left for the usage to fall under the ceiling (+ 0.1 s), instead of probing
    after 0.5, 1, 2 s. Tried and not kept: taking the calls leaving into the gate's prediction
    (throttled and deferred reservations never took room, so they echo as throttles a window
    later), probing only once one of the fleet's calls has left (no change)."""

    CAP, FROM, AHEAD, MARGIN = 1.1, 5, 0.5, 0.1

    def __init__(self, start, window, **kw):
        super().__init__(start, **kw)
        self.window = window
        self.times = [0.0]  # times[i]: when ticket i's slot is
        self.sustained = None

    def tickets_at(self, t):
        return bisect.bisect_right(self.times, t) - 1

    def reserve(self, now):
        r = super().reserve(now)
        if r[0] == "ok":
            self.times.append(now + r[1])
        return r

    def rate(self, now, h):
        paced = self.base * h
        if self.sustained is not None:
            paced = min(paced, self.CAP * self.sustained)
        w = self.window
        gone = (self.tickets_at(now - w + self.AHEAD) - self.tickets_at(now - w)) / self.AHEAD
        return max(paced, self.leave, gone)

    def observe(self, now, u, throttled, reset, ticket):
        k = self.k
        pause = super().observe(now, u, throttled, reset, ticket)
        if ticket > 0 and u >= self.FROM:
            counted = ticket - self.first(ticket)
            if counted > 0:
                self.sustained = counted / self.window * 100.0 / u
                if throttled and self.k > k and u > self.CEIL:
                    exact = self.until_room(now, ticket, u)
                    pause = max(exact, 0.05) if self.k == 1 else max(pause, exact)
                    pause = min(pause, self.longest)
                    self.until = now + pause
        return pause

    def first(self, ticket):
        """The fleet's last ticket one window before `ticket`'s call."""
        return self.tickets_at(self.times[ticket] - self.window)

    def until_room(self, now, ticket, u):
        """How long until enough of the window's calls leave for `u` to fall under the ceiling."""
        first = self.first(ticket)
        room = math.ceil((u - self.CEIL) * (ticket - first) / u)
        j = min(first + room, len(self.times) - 1)
        return self.times[j] + self.window - now + self.MARGIN


class NetOfLeaving(KnownWindow):
    """worker::budget since 2026-12-05: KnownWindow, and (1) no slot is booked while the
    account is paused (a shard whose slot fell in a pause was deferred, its slot never used
    but counted among the fleet's calls, so the window seemed to empty a window later before
    it did); (2) an answer at 100% that was not refused pauses until the window has room too,
    rather than for `reset_time_duration` (whole seconds, rounded down: too early); (3) the rise
    in usage between two readings is read net of the fleet's calls that left the window
    between them (a draining window made a call seem to cost half what it did), and a jump in
    cost starts the readings again; (4) the predicted usage is net of the fleet's calls that
    left the window since the freshest reading's call (+ 0.1 s for the answers' time), save
    those Meta refused or that were never sent: they never counted. (4) is what KnownWindow
    tried and dropped; with refused tickets left out, and no slot booked in a pause, it no
    longer echoes: a 10 s window halved, 1.11 -> 1.04 of the oracle, steady 95 -> 97% of R,
    throttles unchanged."""

    def __init__(self, start, window, **kw):
        super().__init__(start, window, **kw)
        self.refused = []  # sorted tickets Meta never counted

    def reserve(self, now):
        if now < self.until:
            return ("paused", self.until - now)
        return super().reserve(now)

    def unused(self, ticket):
        """A booked slot whose shard was deferred (the pause came while it waited for it)."""
        bisect.insort(self.refused, ticket)

    def predicted(self, now):
        p = super().predicted(now)
        if self.c == 0 or self.nr == 0:
            return p
        fr = self.first(self.nr)
        left = self.tickets_at(now - self.window - self.MARGIN)
        if left <= fr:
            return p
        left -= bisect.bisect_right(self.refused, left) - bisect.bisect_right(self.refused, fr)
        return p - max(left - fr, 0) * self.c

    def calls_between(self, a, b):
        return (b - a) - (self.first(b) - self.first(a))

    def observe(self, now, u, throttled, reset, ticket):
        if throttled and ticket > 0:
            bisect.insort(self.refused, ticket)
        pause = super().observe(now, u, throttled, reset, ticket)
        if throttled and self.jumped:
            self.anchor = None  # a non-refused jump already re-anchored at this reading
        if not throttled and u >= 100 and ticket > 0:
            exact = max(self.until_room(now, ticket, u), 0.05)
            pause = max(min(exact, self.longest), reset, self.until - now)
            self.until = now + pause
        return pause


def run(make, shards, rate, window, workers, change, seed, latency=0.2, jitter=0.02):
    """One export; the bench's figures."""
    rnd = random.Random(seed)
    budget = int(rate * window)
    account = Window(budget, window)
    ctl = make(rate, window) if issubclass(make, KnownWindow) else make(rate)
    events, order = [], 0

    def push(t, kind, data=None):
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, data))

    ready = [(0.0, i) for i in range(shards)]  # (when the shard can be taken, shard)
    idle = 8 * workers  # worker.concurrency is 8
    wake = [None]
    done, changed, paused_until, finished = 0, None, 0.0, None

    def take(now):
        nonlocal idle
        while idle and ready and ready[0][0] <= now:
            heapq.heappop(ready)
            idle -= 1
            push(now, "reserve")
        if idle and ready and (wake[0] is None or wake[0] <= now or ready[0][0] < wake[0]):
            wake[0] = ready[0][0]
            push(ready[0][0], "wake")

    def defer(now, pause):
        nonlocal idle
        heapq.heappush(ready, (now + rnd.uniform(pause, pause * 1.5 + 0.25), 0))
        idle += 1

    push(0.0, "wake")
    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "wake":
            take(now)
        elif kind == "reserve":
            r = ctl.reserve(now)
            if r[0] == "ok":
                push(now + r[1], "slot", r[2])
            elif r[0] == "paused" and r[1] > 0.05:
                # until_ready_unless_paused: a shard is deferred past a pause, not held in it.
                defer(now, r[1])
                take(now)
            elif r[0] == "paused":
                push(now + r[1], "reserve")
            else:
                push(now + min(max(r[1], 0.005), 0.05), "reserve")
        elif kind == "slot":
            if paused_until > now:
                if hasattr(ctl, "unused"):
                    ctl.unused(data)
                defer(now, paused_until - now)
                take(now)
                continue
            ok, u, reset = account.charge(now)
            push(now + latency + rnd.uniform(0, jitter), "answer", (ok, u, reset, data))
        elif kind == "answer":
            ok, u, reset, ticket = data
            pause = ctl.observe(now, u, not ok, reset, ticket)
            if pause:
                paused_until = max(paused_until, now + pause)
            if ok:
                done += 1
                idle += 1
                if changed is None and change != 1.0 and done >= shards // 2:
                    account.budget = int(budget * change)
                    changed = now
                if done == shards:
                    finished = now
                    break
            else:
                defer(now, pause or 1.0)
            take(now)
    figures = {"elapsed": finished, "calls": account.calls, "throttled": account.throttled}
    if changed is None:
        figures["pct_of_R"] = 100 * shards / finished / rate
    else:
        taken = [t for t, ok in account.log if ok]
        after = [t for t in taken if t >= changed]
        allowed = oracle([t for t in taken if t < changed], len(after), changed,
                         account.budget, window)
        figures["ratio"] = (max(after) - changed) / allowed if allowed >= 0.5 else None
    return figures


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("controller", nargs="?", default="net-of-leaving",
                   choices=["slope-only", "inflight-gate", "leave-floor", "known-window",
                            "net-of-leaving"])
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    make = {"slope-only": SlopeOnly, "inflight-gate": InFlightGate, "leave-floor": LeaveFloor,
            "known-window": KnownWindow, "net-of-leaving": NetOfLeaving}[a.controller]
    # The scenarios `just bench` runs (scripts/bench.sh), then a larger budget (R = 100) and a
    # longer export (the 30 s window full when the budget moves).
    for shards, rate, window, workers in [(500, 20, 30.0, 1), (300, 20, 30.0, 4), (600, 20, 10.0, 4),
                                          (3000, 100, 30.0, 4), (2000, 20, 30.0, 4)]:
        for change, name in [(1.0, "steady"), (0.5, "halved"), (2.0, "doubled")]:
            cells = []
            for seed in range(a.seeds):
                f = run(make, shards, rate, window, workers, change, seed)
                cell = f"{f['throttled']}/{f['calls']} throttled"
                if "pct_of_R" in f:
                    cell += f", {f['pct_of_R']:.0f}% of R"
                elif f["ratio"] is not None:
                    cell += f", {f['ratio']:.2f} of the oracle"
                cells.append(cell)
            print(f"R = {rate}, {shards} shards, {window:.0f} s window, {workers} worker(s), {name}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
