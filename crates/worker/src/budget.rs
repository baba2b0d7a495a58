//! One pace per ad account for the whole fleet, moved by Meta's usage headers.
//!
//! Meta's budget is a count of calls per ad account over a sliding window, and it moves: it
//! depends on the account's tier and audiences, and other tools spend it too. The only thing the
//! fleet sees is each answer's usage (percent of the budget in the window). So the fleet keeps,
//! per account, in Redis (every worker shares it, N workers never send N times the pace):
//!
//! - a schedule (GCRA: the account's theoretical arrival time, `pace`): each call reserves the
//!   next slot in one script (`RESERVE`), so calls leave the fleet evenly spaced, never in a
//!   burst, first come first served;
//! - a controller (`rate`): a *base* rate, which starts at `calls_per_second_per_account` and
//!   doubles every `DOUBLING` while usage stays well below the target (up to the configured
//!   maximum: a budget that grew is used), and the last usage with its slope. The slot interval
//!   is `1 / (base × h)`, where `h` falls linearly from 1 to `H_MIN` as the usage *predicted*
//!   `TAU` ahead (last usage + slope × TAU) crosses the band below the target. Near the target
//!   the fleet therefore sends about as fast as the window frees, whatever the budget: a halved
//!   budget slows it within one answer, calls leaving the window speed it up again, and no
//!   fixed pause is waited out;
//! - the calls on the wire: each reservation is numbered (its `Ticket` comes back with the
//!   answer), and once the cost of one call (percent of the budget) is learned from the rise in
//!   usage between readings, the usage is predicted as the freshest reading plus the calls
//!   reserved after it. No slot is booked that would take it past `CEILING` (99%): a fast base
//!   rate can no longer overshoot a small budget by everything it sent in one answer's time,
//!   which with a short window fed a throttling storm that grew every window (20% of calls
//!   throttled at a steady 5 s window before; docs/pace-sim and BENCHMARKS.md). A budget cut
//!   shows as a reading above the prediction and scales the cost up at once;
//! - the rate calls leave the window, measured between readings a second or more apart (the
//!   calls sent, less the rise in usage counted in calls). The pace never falls below it: at
//!   the target a full window takes a call each time one leaves, so an export waiting for a
//!   halved budget goes at what the window frees (R = 100 calls/s, 30 s window: 1.57 of the
//!   time the budget allowed while, at the target, one probe went every 0.25 s; 1.10 now;
//!   BENCHMARKS.md);
//! - with Meta's window known (`usage_window_secs`, an hour on Meta), the fleet's own calls
//!   (`HISTORY`): each usage is read against the calls of the window before the answered call.
//!   Scaled to a full window they are the rate the budget sustains, and `base × h` goes at most
//!   `SUSTAIN_CAP` above it, so a window fills evenly rather than in a burst that comes back
//!   every window; the calls of one window ago are the calls leaving now, a second floor for
//!   the pace; and a full window (a throttled answer, or one at 100%) has room again when
//!   enough of them have left, so the pause lasts until then instead of probing a window that
//!   is still full (R = 20, a 30 s window full when the budget halved: 22 of 2,023 calls
//!   throttled before, BENCHMARKS.md). The rise in usage between two readings is read net of
//!   the fleet's calls that left the window meanwhile: a draining window otherwise made a call
//!   seem to cost half what it did, and the calls on the wire overfilled it. And so is the
//!   predicted usage: the fleet's calls that left the window since the freshest reading's call
//!   made room, save those never counted (refused, or booked and not sent: `refused`); before,
//!   a window that had room waited for an answer, one probe a second (a 10 s window, R = 20,
//!   halved: 1.09 of the time the budget allowed, 1.02 since; steady 92% of R, 96% since).
//!
//! A throttled answer still pauses the account fleet-wide (`AccountPauses`): until the window
//! has room, when its calls are known; otherwise for a probe's time, doubling while Meta keeps
//! refusing (`OBSERVE`), at least `reset_time_duration`, at most
//! `estimated_time_to_regain_access` or `throttle_pause_ms`: the pause ends with one slow call,
//! not a burst, because the last usage (≥ 100%) holds the rate at its floor until an answer says
//! the window has room. Calls already on the wire when a throttle is seen do not double it.
//! No slot is booked while the account is paused (`Slot::Paused`): a slot booked then was
//! deferred with its shard, never used, yet counted among the fleet's calls, so the window
//! seemed to empty before it did (a 10 s window, R = 20, halved: 3 calls throttled a window
//! after the cut, BENCHMARKS.md).
//!
//! The clock is Redis's own (`TIME`), so workers' clocks do not matter. A slot reserved by a
//! worker that dies before using it is lost, never doubled. Every key carries the account's hash
//! tag (one slot on a Redis Cluster) and expires once the account is idle.

use audience_export_core::contract::AdAccountId;
use audience_export_core::graph::Usage;
use audience_export_core::pause::pause_key;
use audience_export_core::redis_conn::{account_key, RedisConn};
use std::time::Duration;

/// The fraction of the base rate kept when the predicted usage reaches the target: slow probes
/// that keep answers (and so usage readings) coming.
const H_MIN: f64 = 0.05;
/// How far ahead the usage is predicted from its slope: about the answers in flight plus one
/// reading's lag, so a rising usage slows the fleet before it reaches the target.
const TAU: Duration = Duration::from_secs(1);
/// How long the base rate takes to double while usage is well below the target.
const DOUBLING: Duration = Duration::from_secs(1);
/// The base rate grows only while the usage, at its current slope, stays below the band for
/// this long: faster than that, the window would fill before the answers could say so, and a
/// window filled in a burst empties in one too (the burst comes back one window later). 5 s
/// let a 10 s window fill at twice what it sustains (docs/pace-sim).
const GROWTH_HORIZON: Duration = Duration::from_secs(10);
/// Over how long the usage's slope is smoothed.
const SLOPE_SMOOTHING: Duration = Duration::from_millis(500);
/// How far ahead a slot may be reserved. A caller whose slot would be later asks again: a slow
/// rate must not book 30 waiting uploads 30 intervals ahead, when the next answer may say the
/// window has room again.
const HORIZON: Duration = Duration::from_millis(50);
/// While one more call on the wire would take the predicted usage past `CEILING`, no slot is
/// booked; one probe goes when the freshest reading is this old (nothing else will bring a new
/// one).
const STALE: Duration = Duration::from_secs(1);
/// The highest usage (%) the calls on the wire may be predicted to take the window to. Meta
/// reports whole percents, rounded down, so a reading of 99 may be a window one call short of
/// full: 99, not 100.
const CEILING: f64 = 99.0;
/// A call's cost (percent of the budget) is learned from rises in usage of at least this many
/// points between two readings: Meta reports whole percents, so a shorter span is mostly
/// rounding.
const COST_SPAN: u64 = 4;
/// The weight of each new estimate of a call's cost. Calls leaving the window make an estimate
/// low, so it is smoothed rather than taken whole; a budget cut raises it at once instead (a
/// reading above what the calls since the last one explain).
const COST_SMOOTHING: f64 = 0.5;
/// The rate calls leave the window is measured between readings at least this far apart: a
/// reading is whole percents, so a shorter span is mostly rounding.
const LEAVE_SPAN: Duration = Duration::from_secs(1);
/// The weight of each new measurement of that rate.
const LEAVE_SMOOTHING: f64 = 0.5;
/// How long the controller's state outlives the account's last answer: an account idle this
/// long (or two windows, if longer: its calls are read against the window's) starts again from
/// the configured rate.
const IDLE: Duration = Duration::from_secs(600);
/// How far above the rate the budget sustains the base rate may go. The sustained rate is the
/// fleet's calls of the last window scaled to a full one; sent faster than that, a window fills
/// in a burst and empties in one, and the burst comes back every window (with a 30 s window
/// and R = 20, the fleet sent 65 calls/s for 9 s, then waited 20 s, and a budget halved during
/// such a burst found 14 calls on the wire; docs/pace-sim). Above 1 so that the window still
/// fills where the estimate runs low.
const SUSTAIN_CAP: f64 = 1.1;
/// The sustained rate is read from usages of at least this much (%): a lower reading is mostly
/// rounding.
const SUSTAIN_FROM: u64 = 5;
/// How many checkpoints of the fleet's calls a window holds (`HISTORY`).
const CHECKPOINTS: u32 = 250;
/// The calls leaving the window now (the fleet's own of one window ago) are counted over this
/// span at least (or two checkpoints, if longer).
const LEAVING_SPAN: Duration = Duration::from_millis(500);
/// After a throttled answer the account waits until enough of the window's calls have left,
/// and this much more (the answers' latency, the clocks' rounding).
const ROOM_MARGIN: Duration = Duration::from_millis(100);

/// The fleet's own calls per account, which Meta's usage is read against: checkpoints
/// `"<ticket>:<ms>"` (a reservation and its slot, Redis clock) every window / CHECKPOINTS, in
/// two sorted sets with the same members, by time (`sent_t`) and by ticket (`sent_n`), kept for
/// two windows. Between checkpoints, and from the last one to the last ticket handed out (`n`,
/// booked for `last`, in the controller's state), tickets are taken as evenly spread. The start
/// of RESERVE and OBSERVE.
macro_rules! history {
    () => {
        r#"
local function checkpoint(member)
  local i = string.find(member, ':', 1, true)
  return tonumber(string.sub(member, 1, i - 1)), tonumber(string.sub(member, i + 1))
end
-- The tickets reserved at or before `t` (ms); nil when nothing is recorded.
local function tickets_at(by_time, t, n, last)
  local a = redis.call('ZREVRANGEBYSCORE', by_time, t, '-inf', 'LIMIT', 0, 1)
  if #a == 0 then
    local b = redis.call('ZRANGE', by_time, 0, 0)
    if #b == 0 then return nil end
    -- Before the first checkpoint: the history starts with it (a new schedule, or an idle one).
    return checkpoint(b[1]) - 1
  end
  local n1, t1 = checkpoint(a[1])
  local n2, t2 = n, last
  local b = redis.call('ZRANGEBYSCORE', by_time, '(' .. t, '+inf', 'LIMIT', 0, 1)
  if #b > 0 then n2, t2 = checkpoint(b[1]) end
  if t >= t2 then return n2 end
  if t2 <= t1 or n2 <= n1 then return n1 end
  return n1 + (n2 - n1) * (t - t1) / (t2 - t1)
end
-- When ticket `j` was reserved (ms); nil when nothing that old is recorded.
local function time_of(by_ticket, j, n, last)
  local a = redis.call('ZREVRANGEBYSCORE', by_ticket, j, '-inf', 'LIMIT', 0, 1)
  if #a == 0 then return nil end
  local n1, t1 = checkpoint(a[1])
  local n2, t2 = n, last
  local b = redis.call('ZRANGEBYSCORE', by_ticket, '(' .. j, '+inf', 'LIMIT', 0, 1)
  if #b > 0 then n2, t2 = checkpoint(b[1]) end
  if n2 <= n1 or t2 <= t1 then return t1 end
  return t1 + (t2 - t1) * (j - n1) / (n2 - n1)
end
"#
    };
}

/// Reserves the next slot of an account's schedule at the controller's current rate.
/// KEYS[1] the account's TAT (µs, Redis clock), KEYS[2] the controller's state, KEYS[3] and
/// KEYS[4] the fleet's calls (`HISTORY`), KEYS[5] the account's fleet-wide pause
/// (`AccountPauses`), KEYS[6] the tickets Meta never counted; ARGV[1] the starting rate
/// (calls/s), [2] the target usage (%), [3] the band below it (%), [4] H_MIN, [5] TAU (ms), [6]
/// HORIZON (µs), [7] STALE (ms), [8] CEILING (%), [9] how long the state outlives the last
/// answer (ms), [10] the window (ms), [11] SUSTAIN_CAP, [12] the span the calls leaving now are
/// counted over (ms), [13] the checkpoints' spacing (ms), [14] ROOM_MARGIN (ms). Answers {1,
/// wait µs, ticket} with the slot reserved, {2, µs until the pause ends} while the account is
/// paused, or {0, µs until asking again} without: the schedule is full beyond the horizon, or
/// the calls already on the wire would take the usage past the ceiling (then one probe goes
/// once the freshest reading is older than STALE). The slot interval is that of `base × h`, at
/// most SUSTAIN_CAP times the rate the budget sustains, or of the rate calls leave the window
/// if faster (measured, or the fleet's own calls of one window ago): at the target the fleet
/// sends as fast as the window frees.
const RESERVE: &str = concat!(
    history!(),
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local s = redis.call('HMGET', KEYS[2], 'base', 'u', 'slope', 'n', 'nr', 'ur', 'tr', 'c', 'l',
  's', 'cp', 'last', 'until', 'fr')
-- A new schedule numbers its tickets from 1: an older history numbers other calls.
if not s[4] then redis.call('DEL', KEYS[3], KEYS[4]) end
-- A paused account books nothing: a slot taken now would be deferred, never used, and yet
-- counted among the fleet's calls in the window. The controller's pause is set with the
-- answer that called for it, the fleet-wide one (KEYS[5]) a round trip later.
local paused = math.max((tonumber(s[13]) or 0) - now_ms, redis.call('PTTL', KEYS[5]))
if paused > 0 then return {2, paused * 1000, 0} end
local base = tonumber(s[1]) or tonumber(ARGV[1])
local u = tonumber(s[2]) or 0
local slope = tonumber(s[3]) or 0
local n = tonumber(s[4]) or 0
local nr = tonumber(s[5]) or 0
local ur = tonumber(s[6]) or 0
local tr = tonumber(s[7]) or 0
local c = tonumber(s[8]) or 0
local l = tonumber(s[9]) or 0
local target = tonumber(ARGV[2])
if slope < 0 then slope = 0 end
local window = tonumber(ARGV[10])
-- The last slot booked (ms), for ticket n.
local last = tonumber(s[12]) or now_ms
local predicted = u + slope * tonumber(ARGV[5]) / 1000
if c > 0 then
  predicted = ur + (n - nr) * c
  -- With the window known, the fleet's calls that left it since the freshest reading's call
  -- (`fr`: the last ticket one window before it) have made room, save those Meta refused or
  -- that were never sent (never counted). Without them a window refilled one probe a second.
  local fr = tonumber(s[14])
  if window > 0 and fr then
    local left = tickets_at(KEYS[3], now_ms - window - tonumber(ARGV[14]), n, last)
    if left and left > fr then
      left = left - fr - redis.call('ZCOUNT', KEYS[6], '(' .. fr, left)
      if left > 0 then predicted = predicted - left * c end
    end
  end
end
local probe = false
if c > 0 and predicted + c > tonumber(ARGV[8]) then
  if now_ms - tr < tonumber(ARGV[7]) then
    return {0, 10000, 0}
  end
  probe = true
end
local h = (target - predicted) / tonumber(ARGV[3])
if h > 1 then h = 1 end
if h < tonumber(ARGV[4]) then h = tonumber(ARGV[4]) end
local rate = base * h
local sustained = tonumber(s[10]) or 0
if sustained > 0 and rate > sustained * tonumber(ARGV[11]) then
  rate = sustained * tonumber(ARGV[11])
end
if l > rate then rate = l end
-- What leaves the window now: the fleet's own calls of one window ago.
local from = window > 0 and tickets_at(KEYS[3], now_ms - window, n, last)
if from then
  local span = tonumber(ARGV[12])
  local gone = (tickets_at(KEYS[3], now_ms - window + span, n, last) - from) * 1000 / span
  if gone > rate then rate = gone end
end
local interval = 1000000 / rate
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tonumber(ARGV[6]) then
  return {0, math.floor(tat - now - tonumber(ARGV[6])), 0}
end
local ttl = math.floor((tat + interval - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', tat + interval), 'PX', ttl)
n = n + 1
if probe then tr = now_ms end
local slot = math.floor(tat / 1000)
local cp = tonumber(s[11])
local spacing = tonumber(ARGV[13])
local function checkpoint_at(j, at)
  local member = j .. ':' .. at
  redis.call('ZADD', KEYS[3], at, member)
  redis.call('ZADD', KEYS[4], j, member)
end
if window > 0 and (cp == nil or slot - cp >= spacing) then
  -- Tickets are taken as evenly spread between checkpoints: after a quiet spell (a pause), the
  -- last reservation before it is one too, or the calls before it would seem spread over it.
  if cp and s[12] and last > cp and slot - last >= spacing then checkpoint_at(n - 1, last) end
  checkpoint_at(n, slot)
  cp = slot
  local old = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. (now_ms - 2 * window))
  if old > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[3], 0, old - 1)
    redis.call('ZREMRANGEBYRANK', KEYS[4], 0, old - 1)
  end
end
redis.call('HSET', KEYS[2], 'n', tostring(n), 'tr', tostring(tr), 'cp', tostring(cp), 'last',
  tostring(slot))
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[9])) end
return {1, math.floor(tat - now), n}
"#
);

/// Feeds one answer's usage to an account's controller. KEYS[1] the controller's state,
/// KEYS[2] and KEYS[3] the fleet's calls (`HISTORY`), KEYS[4] the tickets Meta never counted;
/// ARGV[1] the usage (%), [2] 1 when the call was throttled, [3] the starting rate, [4] the
/// maximum rate (calls/s), [5] target (%), [6] band (%), [7] TAU (ms), [8] DOUBLING (ms), [9]
/// SLOPE_SMOOTHING (ms), [10] first throttle pause (ms), [11] longest throttle pause (ms), [12]
/// Meta's reset time (ms, 0 if none), [13] Meta's regain estimate (ms, 0 if none), [14] how
/// long the state outlives the last answer (ms), [15] GROWTH_HORIZON (ms), [16] the call's
/// ticket (0: unknown), [17] COST_SPAN (%), [18] COST_SMOOTHING, [19] LEAVE_SPAN (ms), [20]
/// LEAVE_SMOOTHING, [21] the window (ms), [22] SUSTAIN_FROM (%), [23] ROOM_MARGIN (ms), [24]
/// CEILING (%). Answers {the pause the account
/// needs now (ms; 0: none), the base rate, the rate calls leave the window and the rate the
/// budget sustains (thousandths of a call per second), a call's cost (thousandths of a
/// percent)}.
const OBSERVE: &str = concat!(
    history!(),
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'base', 'slope', 'uref', 'tu', 'tg', 'k', 'until',
  'nr', 'ur', 'c', 'na', 'ua', 'n', 'tr', 'l', 'lt', 'ln', 'lu', 's', 'fa', 'fr', 'last')
local base = tonumber(s[1]) or tonumber(ARGV[3])
local slope = tonumber(s[2]) or 0
local uref = tonumber(s[3])
local tu = tonumber(s[4]) or now
local tg = tonumber(s[5]) or now
local k = tonumber(s[6]) or 0
local paused_until = tonumber(s[7]) or 0
local nr = tonumber(s[8]) or 0
local ur = tonumber(s[9]) or 0
local c = tonumber(s[10]) or 0
local na = tonumber(s[11])
local ua = tonumber(s[12])
local fa = tonumber(s[20])
local fr = tonumber(s[21])
local tr = tonumber(s[14]) or 0
local u = tonumber(ARGV[1])
local throttled = ARGV[2] == '1'
local ticket = tonumber(ARGV[16])
-- A ticket from before the state expired (or was lost) numbers nothing in this schedule.
if ticket > (tonumber(s[13]) or 0) then ticket = 0 end
local reset = tonumber(ARGV[12])
local pause = 0
-- With the window known: the fleet's calls in the window this reading saw are those from
-- `first` (one window before the call) to the call.
local window = tonumber(ARGV[21])
-- The last ticket handed out, and its slot (ms).
local n = tonumber(s[13]) or ticket
local last = tonumber(s[22]) or now
local first
if window > 0 and ticket > 0 then
  local sent = time_of(KEYS[3], ticket, n, last)
  if sent then first = tickets_at(KEYS[2], sent - window, n, last) end
end
-- The freshest reading (the highest ticket answered) and the cost of a call: a reading above
-- what the calls since the last one explain means the budget shrank; scale the cost with it.
local jumped = false
if ticket > nr then
  local expected = ur + (ticket - nr) * c
  if c > 0 and expected > 0 and u > expected + 1 then
    c = c * u / expected
    jumped = true
  end
  nr = ticket
  ur = u
  if throttled and ur < 100 then ur = 100 end
  tr = now
  fr = first
  -- Refused tickets older than the freshest reading's window are never asked about again.
  if fr then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', fr) end
end
-- A refused call never counted in Meta's window: it makes no room when it would have left.
if throttled and ticket > 0 then
  redis.call('ZADD', KEYS[4], ticket, ticket)
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[14]))
end
-- A rise in usage between two readings is the calls sent between them less those that left
-- the window: the fleet's own that left are known with the window (`first` moved), and without
-- them a draining window made the cost seem half what it was, and let the calls on the wire
-- overfill it. Only samples within one budget: a jump starts again.
if jumped then na = nil end
if ticket > 0 and not throttled then
  if na == nil or u < ua then
    na, ua, fa = ticket, u, first
  elseif ticket > na and u - ua >= tonumber(ARGV[17]) then
    local calls = ticket - na
    if first and fa then calls = calls - (first - fa) end
    if calls > 0 then
      local sample = (u - ua) / calls
      if c == 0 then c = sample else
        local w = tonumber(ARGV[18])
        c = (1 - w) * c + w * sample
      end
    end
    na, ua, fa = ticket, u, first
  end
end
-- The rate calls leave the window: the calls sent between two readings a span apart, less
-- what the usage rose by (in calls).
local l = tonumber(s[15]) or 0
local lt = tonumber(s[16])
local ln = tonumber(s[17])
local lu = tonumber(s[18])
if ticket > 0 and not throttled and c > 0 then
  if lt == nil or jumped then
    lt = now
    ln = ticket
    lu = u
  elseif ticket > ln and now - lt >= tonumber(ARGV[19]) then
    local left = (ticket - ln) - (u - lu) / c
    if left < 0 then left = 0 end
    local w = tonumber(ARGV[20])
    l = (1 - w) * l + w * left * 1000 / (now - lt)
    -- Calls booked but never sent (a pause came while they waited for their slot) count as
    -- sent: never past the configured maximum.
    if l > tonumber(ARGV[4]) then l = tonumber(ARGV[4]) end
    lt = now
    ln = ticket
    lu = u
  end
end
-- The rate the budget sustains: the fleet's calls in the window this reading saw, scaled to a
-- full window. Readings too low say little.
local sustained = tonumber(s[19]) or 0
local counted
if first and ticket > first and u >= tonumber(ARGV[22]) then
  counted = ticket - first
  sustained = counted * 1000 / window * 100 / u
end
-- With the window's calls known, a full window has room again when enough of them have left
-- for the usage to fall under the ceiling (the fleet's oldest first): how long until then (ms),
-- nil when they are not known.
local function until_room()
  local ceiling = tonumber(ARGV[24])
  if not counted or u <= ceiling then return nil end
  local room = math.ceil((u - ceiling) * counted / u)
  local freed = time_of(KEYS[3], first + room, n, last)
  if not freed then return nil end
  return math.max(freed + window - now + tonumber(ARGV[23]), 50)
end
if throttled then
  if now >= paused_until then
    k = k + 1
    pause = tonumber(ARGV[10]) * 2 ^ (k - 1)
    local exact = until_room()
    if exact and (k == 1 or exact > pause) then pause = exact end
    if pause > tonumber(ARGV[11]) then pause = tonumber(ARGV[11]) end
    if reset > pause then pause = reset end
    local regain = tonumber(ARGV[13])
    if regain > 0 and regain < pause then pause = regain end
    paused_until = now + pause
  else
    pause = paused_until - now
  end
  if u < 100 then u = 100 end
else
  if uref == nil then uref = u end
  local dt = now - tu
  if dt >= 50 then
    local a = dt / tonumber(ARGV[9])
    if a > 1 then a = 1 end
    slope = (1 - a) * slope + a * (u - uref) * 1000 / dt
    tu = now
    uref = u
  end
  k = 0
  if u >= 100 then
    -- The window is full (this call took its last room): no probe into it before it has room.
    pause = until_room() or tonumber(ARGV[10])
    if pause > tonumber(ARGV[11]) then pause = tonumber(ARGV[11]) end
    if reset > pause then pause = reset end
    if paused_until > now + pause then pause = paused_until - now end
    paused_until = now + pause
  else
    local up = slope
    if up < 0 then up = 0 end
    if u + up * tonumber(ARGV[15]) / 1000 < tonumber(ARGV[5]) - tonumber(ARGV[6]) then
      local since = now - tg
      if since > tonumber(ARGV[8]) then since = tonumber(ARGV[8]) end
      base = base * 2 ^ (since / tonumber(ARGV[8]))
      if base > tonumber(ARGV[4]) then base = tonumber(ARGV[4]) end
    end
  end
end
redis.call('HSET', KEYS[1], 'base', tostring(base), 'u', tostring(u), 'slope', tostring(slope),
  'uref', tostring(uref or u), 'tu', tostring(tu), 'tg', tostring(now), 'k', tostring(k),
  'until', tostring(paused_until), 'nr', tostring(nr), 'ur', tostring(ur), 'tr', tostring(tr),
  'c', tostring(c),
  'na', tostring(na or ''), 'ua', tostring(ua or ''), 'fa', tostring(fa or ''),
  'fr', tostring(fr or ''),
  'l', tostring(l), 'lt', tostring(lt or ''), 'ln', tostring(ln or ''), 'lu', tostring(lu or ''),
  's', tostring(sustained))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[14]))
return {math.floor(pause), math.floor(base * 1000), math.floor(l * 1000),
  math.floor(sustained * 1000), math.floor(c * 1000)}
"#
);

/// The controller's settings, from the worker's.
#[derive(Debug, Clone, Copy)]
pub struct Controls {
    /// Where each account starts (calls/s), fleet-wide.
    pub start_per_sec: u32,
    /// The most the fleet sends to one account, however low its usage.
    pub max_per_sec: u32,
    /// The usage the fleet paces toward (%).
    pub target_pct: u64,
    /// The width of the band below the target in which the rate falls to its floor (%).
    pub band_pct: u64,
    /// The first pause after a throttled answer; it doubles while Meta keeps throttling.
    pub first_throttle_pause: Duration,
    /// The longest pause after a throttled answer without a regain estimate.
    pub longest_throttle_pause: Duration,
    /// The length of Meta's rate-limit window; unknown, the fleet reads only the usage (no
    /// sustained rate, no calls leaving by the fleet's own, probes after a throttle).
    pub window: Option<Duration>,
}

impl Controls {
    /// The spacing of the checkpoints of the fleet's calls.
    fn checkpoint_every(&self) -> Duration {
        (self.window.unwrap_or_default() / CHECKPOINTS).max(Duration::from_millis(1))
    }

    /// The window in milliseconds, 0 when unknown (the scripts' convention).
    fn window_ms(&self) -> u64 {
        self.window.map_or(0, |w| w.as_millis() as u64)
    }

    /// The span the calls leaving the window now are counted over.
    fn leaving_span(&self) -> Duration {
        LEAVING_SPAN.max(2 * self.checkpoint_every())
    }

    /// How long an account's state outlives its last answer or reservation.
    fn idle(&self) -> Duration {
        IDLE.max(2 * self.window.unwrap_or_default())
    }
}

impl Controls {
    pub fn from_settings(w: &audience_export_core::config::WorkerSettings) -> Controls {
        Controls {
            start_per_sec: w.calls_per_second_per_account.max(1),
            max_per_sec: w
                .max_calls_per_second_per_account
                .max(w.calls_per_second_per_account)
                .max(1),
            target_pct: w.usage_target_pct.clamp(1, 100),
            band_pct: w.usage_band_pct.max(1),
            first_throttle_pause: Duration::from_millis(w.throttle_probe_ms.max(1)),
            longest_throttle_pause: Duration::from_millis(
                w.throttle_pause_ms.max(w.throttle_probe_ms),
            ),
            window: (w.usage_window_secs > 0).then(|| Duration::from_secs(w.usage_window_secs)),
        }
    }

    /// A fixed rate (no growth, the floor far away): for tests and benches that need one.
    pub fn fixed(per_sec: u32) -> Controls {
        Controls {
            start_per_sec: per_sec.max(1),
            max_per_sec: per_sec.max(1),
            target_pct: 100,
            band_pct: 1,
            first_throttle_pause: Duration::from_secs(1),
            longest_throttle_pause: Duration::from_secs(60),
            window: None,
        }
    }
}

#[derive(Clone)]
pub struct FleetBudget {
    redis: RedisConn,
    ns: String,
    reserve: redis::Script,
    observe: redis::Script,
    controls: Controls,
}

impl FleetBudget {
    /// The schedules of every ad account for the workers of namespace `ns`.
    pub fn new(redis: RedisConn, ns: &str, controls: Controls) -> FleetBudget {
        FleetBudget {
            redis,
            ns: ns.to_owned(),
            reserve: redis::Script::new(RESERVE),
            observe: redis::Script::new(OBSERVE),
            controls,
        }
    }

    /// The account's schedule, controller state, the fleet's calls by time and by ticket, and
    /// the tickets never counted in Meta's window (refused, or never sent).
    fn keys(&self, account: &AdAccountId) -> [String; 5] {
        ["pace", "rate", "sent_t", "sent_n", "refused"]
            .map(|what| account_key(&self.ns, account.as_str(), what))
    }

    /// Waits for this call's slot of the account's fleet-wide schedule, and out any pause of the
    /// account; its ticket goes back with the answer (`observe`). When Redis cannot be asked, it
    /// waits one interval of the starting rate instead: this worker alone then keeps to it, and
    /// the call's effect cannot be recorded until Redis is back anyway.
    pub async fn until_ready(&self, account: &AdAccountId) -> Ticket {
        match self.slot_within(account, None).await {
            Ok(ticket) => ticket,
            Err(_) => unreachable!("every pause is waited out"),
        }
    }

    /// As `until_ready`, but gives up on a pause longer than `HORIZON` and says how long it
    /// lasts: a shard is better deferred than held unacked through it.
    pub async fn until_ready_unless_paused(
        &self,
        account: &AdAccountId,
    ) -> Result<Ticket, Duration> {
        self.slot_within(account, Some(HORIZON)).await
    }

    async fn slot_within(
        &self,
        account: &AdAccountId,
        longest_pause: Option<Duration>,
    ) -> Result<Ticket, Duration> {
        loop {
            match self.reserve(account).await {
                Ok(Slot::Reserved(wait, ticket)) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    return Ok(ticket);
                }
                Ok(Slot::Later(wait)) => {
                    tokio::time::sleep(wait.clamp(Duration::from_millis(5), HORIZON)).await
                }
                Ok(Slot::Paused(left)) if longest_pause.is_some_and(|l| left > l) => {
                    return Err(left)
                }
                Ok(Slot::Paused(left)) => tokio::time::sleep(left).await,
                Err(error) => {
                    tracing::warn!(message = "The fleet's pace could not be read; pacing this worker alone.", %error);
                    let interval = 1.0 / f64::from(self.controls.start_per_sec);
                    tokio::time::sleep(Duration::from_secs_f64(interval)).await;
                    return Ok(Ticket::UNKNOWN);
                }
            }
        }
    }

    /// Reserves the next slot, or says when to ask again.
    pub async fn reserve(&self, account: &AdAccountId) -> redis::RedisResult<Slot> {
        let [pace, rate, by_time, by_ticket, refused] = self.keys(account);
        let c = &self.controls;
        let mut conn = self.redis.clone();
        let (reserved, wait_us, ticket): (i64, i64, u64) = self
            .reserve
            .key(pace)
            .key(rate)
            .key(by_time)
            .key(by_ticket)
            .key(pause_key(&self.ns, account))
            .key(refused)
            .arg(c.start_per_sec)
            .arg(c.target_pct)
            .arg(c.band_pct)
            .arg(H_MIN)
            .arg(TAU.as_millis() as u64)
            .arg(HORIZON.as_micros() as u64)
            .arg(STALE.as_millis() as u64)
            .arg(CEILING)
            .arg(c.idle().as_millis() as u64)
            .arg(c.window_ms())
            .arg(SUSTAIN_CAP)
            .arg(c.leaving_span().as_millis() as u64)
            .arg(c.checkpoint_every().as_millis() as u64)
            .arg(ROOM_MARGIN.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        let wait = Duration::from_micros(wait_us.max(0) as u64);
        Ok(match reserved {
            1 => Slot::Reserved(wait, Ticket(ticket)),
            2 => Slot::Paused(wait),
            _ => Slot::Later(wait),
        })
    }

    /// Records that a reserved slot went unused (its shard was deferred): like a refused call,
    /// it never counted in Meta's window, so it makes no room when it would have left it.
    pub async fn unused(&self, account: &AdAccountId, ticket: Ticket) -> redis::RedisResult<()> {
        if ticket == Ticket::UNKNOWN {
            return Ok(());
        }
        let [.., refused] = self.keys(account);
        let mut conn = self.redis.clone();
        redis::pipe()
            .zadd(&refused, ticket.0, ticket.0)
            .ignore()
            .pexpire(&refused, self.controls.idle().as_millis() as i64)
            .ignore()
            .query_async(&mut conn)
            .await
    }

    /// Feeds an answer's usage (or a throttling answer's) to the account's controller; the
    /// pause the account needs now, if any, and its pace. None when there was nothing to
    /// steer by (an answer without usage headers).
    pub async fn observe(
        &self,
        account: &AdAccountId,
        ticket: Ticket,
        usage: Option<&Usage>,
        throttled: bool,
    ) -> redis::RedisResult<Option<Observed>> {
        if usage.is_none() && !throttled {
            return Ok(None);
        }
        // A throttling answer without usage headers still says the window is full.
        let percent = usage.map_or(100, |u| u.percent);
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis() as u64);
        let [_, rate, by_time, by_ticket, refused] = self.keys(account);
        let c = &self.controls;
        let mut conn = self.redis.clone();
        let (pause_ms, base_milli, leave_milli, sustained_milli, cost_milli): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = self
            .observe
            .key(rate)
            .key(by_time)
            .key(by_ticket)
            .key(refused)
            .arg(percent)
            .arg(u8::from(throttled))
            .arg(c.start_per_sec)
            .arg(c.max_per_sec)
            .arg(c.target_pct)
            .arg(c.band_pct)
            .arg(TAU.as_millis() as u64)
            .arg(DOUBLING.as_millis() as u64)
            .arg(SLOPE_SMOOTHING.as_millis() as u64)
            .arg(c.first_throttle_pause.as_millis() as u64)
            .arg(c.longest_throttle_pause.as_millis() as u64)
            .arg(ms(usage.and_then(|u| u.reset)))
            .arg(ms(usage.and_then(|u| u.regain)))
            .arg(c.idle().as_millis() as u64)
            .arg(GROWTH_HORIZON.as_millis() as u64)
            .arg(ticket.0)
            .arg(COST_SPAN)
            .arg(COST_SMOOTHING)
            .arg(LEAVE_SPAN.as_millis() as u64)
            .arg(LEAVE_SMOOTHING)
            .arg(c.window_ms())
            .arg(SUSTAIN_FROM)
            .arg(ROOM_MARGIN.as_millis() as u64)
            .arg(CEILING)
            .invoke_async(&mut conn)
            .await?;
        Ok(Some(Observed {
            pause: (pause_ms > 0).then(|| Duration::from_millis(pause_ms as u64)),
            pace_per_sec: base_milli as f64 / 1000.0,
            leave_per_sec: leave_milli as f64 / 1000.0,
            sustained_per_sec: sustained_milli as f64 / 1000.0,
            cost_pct: cost_milli as f64 / 1000.0,
        }))
    }
}

/// What an answer did to an account's controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    /// The pause the account needs now, if any.
    pub pause: Option<Duration>,
    /// The base rate after the answer (calls/s).
    pub pace_per_sec: f64,
    /// The rate calls leave the account's window, as measured so far (calls/s; 0 until a
    /// call's cost is known): the pace never goes below it.
    pub leave_per_sec: f64,
    /// The rate the budget sustains, as read so far (calls/s; 0 until a reading of at least
    /// `SUSTAIN_FROM`): the fleet's calls of the last window, scaled to a full one. The base
    /// rate goes at most `SUSTAIN_CAP` times above it.
    pub sustained_per_sec: f64,
    /// What one call costs (percent of the budget), as learned so far (0 until known): the
    /// calls on the wire are counted against the ceiling at this cost.
    pub cost_pct: f64,
}

/// A reserved slot's number in its account's schedule. An answer's usage is read against the
/// calls reserved after it: those are on the wire, and will count too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ticket(pub u64);

impl Ticket {
    /// A call made without a reservation (Redis could not be asked): its usage steers the pace
    /// but is not read against the calls on the wire.
    pub const UNKNOWN: Ticket = Ticket(0);
}

/// A reservation's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The slot is this call's: wait this long for it.
    Reserved(Duration, Ticket),
    /// The schedule is full beyond the horizon: ask again in about this long.
    Later(Duration),
    /// The account is paused (a full window, a throttled answer) for this long: nothing is
    /// booked, so no slot is lost to a call deferred by the pause.
    Paused(Duration),
}
