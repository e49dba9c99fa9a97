//! Schedules, the pure part: a cron expression in a time zone, the instants
//! it names, and what one run of the scheduler does with the firings that
//! are due. No IO: the store hands in database time and the schedule's row,
//! and writes what `plan` decides.
//!
//! **Wall-clock rule.** A cron names local wall-clock times in its zone.
//! Where a daylight-saving change skips local times (spring forward), a time
//! in the gap fires once, at the first instant after the gap (02:30 fires at
//! 03:00 on the night Europe/Berlin springs forward); several such times
//! fold into that one firing. Where a change repeats local times (fall
//! back), a repeated time fires once, at its first occurrence, so a nightly
//! job never runs twice; an every-15-minutes schedule then rests through
//! the repeated hour. This is the rule of Vixie cron for fixed-time jobs and
//! of Quartz; a schedule that must fire on elapsed time through the change
//! uses `UTC` (the default zone), which has neither.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use crate::model::Overlap;

/// A checked cron expression and its time zone.
#[derive(Debug, Clone)]
pub(crate) struct CronSpec {
    cron: croner::Cron,
    tz: Tz,
}

/// What is wrong with a schedule's cron or zone, for the field it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SpecError {
    #[error("not a cron expression: {0}")]
    Cron(String),
    #[error("the cron expression names no time that ever comes")]
    Never,
    #[error("not an IANA time zone (such as Europe/Berlin or UTC): {0:?}")]
    Zone(String),
}

impl SpecError {
    /// The request field the problem is in.
    pub(crate) fn field(&self) -> &'static str {
        match self {
            SpecError::Cron(_) | SpecError::Never => "cron",
            SpecError::Zone(_) => "timezone",
        }
    }
}

/// Missed firings are counted up to this many per run (a per-second
/// schedule down for a day misses 86,400; counting them all buys nothing).
const MAX_MISSED_COUNTED: u64 = 10_000;

/// The farthest a firing is looked for: past it a cron "never" fires.
const HORIZON_DAYS: i64 = 5 * 366;

impl CronSpec {
    /// Standard 5-field cron (minute hour day-of-month month day-of-week),
    /// or 6 fields with seconds first; names (`MON`, `JAN`) and `L`, `#`,
    /// `W` as croner reads them.
    pub(crate) fn parse(cron: &str, timezone: &str) -> Result<Self, SpecError> {
        let tz: Tz = timezone
            .parse()
            .map_err(|_| SpecError::Zone(timezone.to_string()))?;
        let fields = cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(SpecError::Cron(format!(
                "{cron:?} has {fields} fields; a cron has 5 (minute hour day month weekday), \
                 or 6 with seconds first"
            )));
        }
        let cron = croner::Cron::new(cron)
            .with_seconds_optional()
            .parse()
            .map_err(|e| SpecError::Cron(format!("{cron:?}: {e}")))?;
        Ok(CronSpec { cron, tz })
    }

    /// Like `parse`, and the expression must name a time within the next
    /// five years of `now` (`0 0 30 2 *` never does).
    pub(crate) fn parse_live(
        cron: &str,
        timezone: &str,
        now: DateTime<Utc>,
    ) -> Result<Self, SpecError> {
        let spec = Self::parse(cron, timezone)?;
        match spec.next_after(now) {
            Some(_) => Ok(spec),
            None => Err(SpecError::Never),
        }
    }

    /// The first firing strictly after `t`, by the wall-clock rule above;
    /// `None` if there is none within five years.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = t.with_nanosecond(0)?;
        let local = t.with_timezone(&self.tz);
        let naive = local.naive_local();
        // In the second pass of a repeated hour, the local times until the
        // repeat ends fired in the first pass: look from where it ends.
        let (mut from, mut inclusive) = match self.tz.from_local_datetime(&naive) {
            LocalResult::Ambiguous(_, later) if later == local => (self.repeat_end(naive)?, true),
            _ => (naive, false),
        };
        let limit = naive + Duration::days(HORIZON_DAYS);
        loop {
            let occurrence = self
                .cron
                .find_next_occurrence(&Utc.from_utc_datetime(&from), inclusive)
                .ok()?
                .naive_utc();
            if occurrence > limit {
                return None;
            }
            let instant = self.instant_of(occurrence)?;
            if instant > t {
                return Some(instant);
            }
            from = occurrence;
            inclusive = false;
        }
    }

    /// The next `n` firings after `t`.
    pub(crate) fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        std::iter::successors(self.next_after(t), |&prev| self.next_after(prev))
            .take(n)
            .collect()
    }

    /// The instant a local time fires at: itself, its first occurrence if
    /// repeated, or the end of the gap if skipped.
    fn instant_of(&self, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&naive) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
            LocalResult::None => {
                // Gaps begin and end on whole minutes (of every zone since
                // local mean time); the first valid minute ends it.
                let minute = naive.with_second(0)?;
                (1..=48 * 60).find_map(|m| {
                    match self
                        .tz
                        .from_local_datetime(&(minute + Duration::minutes(m)))
                    {
                        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                            Some(t.with_timezone(&Utc))
                        }
                        LocalResult::None => None,
                    }
                })
            }
        }
    }

    /// The first local time at or after `naive` that is not repeated.
    fn repeat_end(&self, naive: NaiveDateTime) -> Option<NaiveDateTime> {
        let minute = naive.with_second(0)?;
        (1..=48 * 60)
            .map(|m| minute + Duration::minutes(m))
            .find(|n| !matches!(self.tz.from_local_datetime(n), LocalResult::Ambiguous(..)))
    }
}

/// A due schedule, as one scheduler run sees it.
#[derive(Debug, Clone)]
pub(crate) struct Due {
    /// The firing the schedule waits for (at or before `now`).
    pub next_fire_at: DateTime<Utc>,
    pub overlap: Overlap,
    /// How far back a late firing is still made up (at least the grace).
    pub window_ms: u64,
    /// The instance the last firing started is still running.
    pub previous_running: bool,
}

/// What one run does with a due schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The firings that start an instance, oldest first.
    pub start: Vec<DateTime<Utc>>,
    /// Due firings not started because of the overlap policy.
    pub skipped: u64,
    /// Firings older than the window (downtime past the catchup).
    pub missed: u64,
    /// Ask the running previous instance to cancel (`cancel_previous`).
    pub cancel_previous: bool,
    /// The first firing this run did not consider.
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// Decides one run for a due schedule: the firings at or before `now`, at
/// most `max_firings` of them (the rest wait for the next run), each
/// started, skipped for the overlap policy, or missed (older than the
/// window).
pub(crate) fn plan(spec: &CronSpec, due: &Due, now: DateTime<Utc>, max_firings: usize) -> Plan {
    let oldest = now - Duration::milliseconds(due.window_ms.min(i64::MAX as u64) as i64);
    let mut plan = Plan {
        start: Vec::new(),
        skipped: 0,
        missed: 0,
        cancel_previous: false,
        next_fire_at: Some(due.next_fire_at),
    };
    let mut considered = 0;
    // Missed firings are only counted: skipping them is one jump, however
    // long the downtime.
    if due.next_fire_at < oldest {
        let first_in_window = spec
            .next_after(oldest - Duration::seconds(1))
            .filter(|t| *t <= now);
        plan.missed = count_between(spec, due.next_fire_at, oldest, MAX_MISSED_COUNTED);
        plan.next_fire_at = first_in_window.or_else(|| spec.next_after(now));
    }
    let mut in_window = Vec::new();
    while let Some(at) = plan.next_fire_at.filter(|t| *t <= now) {
        if considered == max_firings {
            break;
        }
        considered += 1;
        in_window.push(at);
        plan.next_fire_at = spec.next_after(at);
    }
    match due.overlap {
        Overlap::Allow => plan.start = in_window,
        Overlap::Skip => {
            if !due.previous_running && !in_window.is_empty() {
                plan.start.push(in_window[0]);
            }
            plan.skipped = (in_window.len() - plan.start.len()) as u64;
        }
        Overlap::CancelPrevious => {
            // Each firing would cancel the one before: only the latest runs.
            if let Some(&last) = in_window.last() {
                plan.start.push(last);
                plan.cancel_previous = due.previous_running;
            }
            plan.skipped = in_window.len().saturating_sub(1) as u64;
        }
    }
    plan
}

/// Firings in `[from, until)`, counted up to `cap`.
fn count_between(spec: &CronSpec, from: DateTime<Utc>, until: DateTime<Utc>, cap: u64) -> u64 {
    let mut n = 0;
    let mut at = Some(from);
    while let Some(t) = at.filter(|t| *t < until) {
        n += 1;
        if n == cap {
            break;
        }
        at = spec.next_after(t);
    }
    n
}

/// The id of the instance a firing starts: the same for the same firing,
/// whoever fires it, so a firing repeated after a failover starts nothing.
pub(crate) fn instance_id(schedule: &str, at: DateTime<Utc>) -> String {
    format!("sched:{schedule}:{}", at.format("%Y-%m-%dT%H:%M:%SZ"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn spec(cron: &str, tz: &str) -> CronSpec {
        CronSpec::parse(cron, tz).unwrap()
    }

    fn firings(cron: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        spec(cron, tz)
            .upcoming(utc(from), n)
            .iter()
            .map(|t| t.to_rfc3339())
            .collect()
    }

    #[test]
    fn five_and_six_fields_parse_and_others_name_the_field() {
        assert!(CronSpec::parse("*/5 * * * *", "UTC").is_ok());
        assert!(CronSpec::parse("* * * * * *", "UTC").is_ok());
        assert_eq!(CronSpec::parse("* * *", "UTC").unwrap_err().field(), "cron");
        assert_eq!(
            CronSpec::parse("61 * * * *", "UTC").unwrap_err().field(),
            "cron"
        );
        assert_eq!(
            CronSpec::parse("* * * * *", "Mars/Olympus").unwrap_err(),
            SpecError::Zone("Mars/Olympus".into())
        );
        let now = utc("2026-01-01T00:00:00Z");
        assert_eq!(
            CronSpec::parse_live("0 0 30 2 *", "UTC", now).unwrap_err(),
            SpecError::Never
        );
    }

    #[test]
    fn every_second_fires_on_each_whole_second_after_the_instant() {
        assert_eq!(
            firings("* * * * * *", "UTC", "2026-01-01T00:00:00.400Z", 3),
            [
                "2026-01-01T00:00:01+00:00",
                "2026-01-01T00:00:02+00:00",
                "2026-01-01T00:00:03+00:00"
            ]
        );
    }

    #[test]
    fn berlin_spring_forward_fires_a_skipped_time_once_at_the_end_of_the_gap() {
        // 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC).
        assert_eq!(
            firings("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 3),
            [
                "2026-03-29T01:00:00+00:00", // 03:00 CEST, the gap's end
                "2026-03-30T00:30:00+00:00", // 02:30 CEST
                "2026-03-31T00:30:00+00:00",
            ]
        );
        // Every 15 minutes: 02:00-02:45 fold into one firing at 03:00.
        assert_eq!(
            firings("*/15 * * * *", "Europe/Berlin", "2026-03-29T00:40:00Z", 4),
            [
                "2026-03-29T00:45:00+00:00", // 01:45 CET
                "2026-03-29T01:00:00+00:00", // 03:00 CEST
                "2026-03-29T01:15:00+00:00",
                "2026-03-29T01:30:00+00:00",
            ]
        );
    }

    #[test]
    fn berlin_fall_back_fires_a_repeated_time_once_at_its_first_occurrence() {
        // 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC).
        assert_eq!(
            firings("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            [
                "2026-10-25T00:30:00+00:00", // 02:30 CEST, not 02:30 CET
                "2026-10-26T01:30:00+00:00", // 02:30 CET
            ]
        );
        // Hourly: 02:00 CEST, then no 02:00 CET, then 03:00 CET.
        assert_eq!(
            firings("0 * * * *", "Europe/Berlin", "2026-10-24T23:30:00Z", 3),
            [
                "2026-10-25T00:00:00+00:00", // 02:00 CEST
                "2026-10-25T02:00:00+00:00", // 03:00 CET
                "2026-10-25T03:00:00+00:00",
            ]
        );
    }

    #[test]
    fn new_york_transitions_follow_the_same_rule() {
        // 2026-03-08: 02:00 EST becomes 03:00 EDT (07:00 UTC).
        assert_eq!(
            firings("15 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T07:00:00+00:00", "2026-03-09T06:15:00+00:00"]
        );
        // 2026-11-01: 02:00 EDT becomes 01:00 EST (06:00 UTC); 01:30
        // happens twice and fires once, in EDT.
        assert_eq!(
            firings("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00+00:00", "2026-11-02T06:30:00+00:00"]
        );
    }

    #[test]
    fn an_instant_in_the_second_pass_of_a_repeat_looks_past_the_repeat() {
        // 01:20 EST, the second 01:20 of the night: 01:30 fired in EDT
        // already; the next firing of "every 30 minutes" is 02:00 EST.
        assert_eq!(
            firings(
                "*/30 * * * *",
                "America/New_York",
                "2026-11-01T06:20:00Z",
                2
            ),
            ["2026-11-01T07:00:00+00:00", "2026-11-01T07:30:00+00:00"]
        );
    }

    fn due(at: &str, overlap: Overlap, window_ms: u64, previous_running: bool) -> Due {
        Due {
            next_fire_at: utc(at),
            overlap,
            window_ms,
            previous_running,
        }
    }

    #[test]
    fn allow_starts_every_due_firing_in_the_window_up_to_the_batch() {
        let s = spec("* * * * * *", "UTC");
        let now = utc("2026-01-01T00:00:05.5Z");
        let p = plan(
            &s,
            &due("2026-01-01T00:00:03Z", Overlap::Allow, 60_000, true),
            now,
            10,
        );
        assert_eq!(p.start.len(), 3);
        assert_eq!(p.next_fire_at, Some(utc("2026-01-01T00:00:06Z")));
        let p = plan(
            &s,
            &due("2026-01-01T00:00:03Z", Overlap::Allow, 60_000, true),
            now,
            2,
        );
        assert_eq!(
            p.start,
            [utc("2026-01-01T00:00:03Z"), utc("2026-01-01T00:00:04Z")]
        );
        assert_eq!(p.next_fire_at, Some(utc("2026-01-01T00:00:05Z")));
    }

    #[test]
    fn skip_starts_nothing_while_the_previous_runs_and_the_first_due_once_it_ended() {
        let s = spec("* * * * * *", "UTC");
        let now = utc("2026-01-01T00:00:05Z");
        let running = plan(
            &s,
            &due("2026-01-01T00:00:04Z", Overlap::Skip, 60_000, true),
            now,
            10,
        );
        assert!(running.start.is_empty());
        assert_eq!(running.skipped, 2);
        assert_eq!(running.next_fire_at, Some(utc("2026-01-01T00:00:06Z")));
        let ended = plan(
            &s,
            &due("2026-01-01T00:00:04Z", Overlap::Skip, 60_000, false),
            now,
            10,
        );
        assert_eq!(ended.start, [utc("2026-01-01T00:00:04Z")]);
        assert_eq!(ended.skipped, 1);
    }

    #[test]
    fn cancel_previous_starts_the_latest_and_cancels_a_running_previous() {
        let s = spec("* * * * * *", "UTC");
        let p = plan(
            &s,
            &due(
                "2026-01-01T00:00:04Z",
                Overlap::CancelPrevious,
                60_000,
                true,
            ),
            utc("2026-01-01T00:00:05Z"),
            10,
        );
        assert_eq!(p.start, [utc("2026-01-01T00:00:05Z")]);
        assert!(p.cancel_previous);
        assert_eq!(p.skipped, 1);
    }

    #[test]
    fn firings_older_than_the_window_are_missed_in_one_jump() {
        // Down from 00:00 to 10:00 with a 2 h catchup on an hourly cron:
        // 00:00-07:00 are missed, 08:00-10:00 are made up.
        let s = spec("0 * * * *", "UTC");
        let p = plan(
            &s,
            &due("2026-01-01T00:00:00Z", Overlap::Allow, 2 * 3_600_000, false),
            utc("2026-01-01T10:00:00Z"),
            100,
        );
        assert_eq!(p.missed, 8);
        assert_eq!(
            p.start,
            [
                utc("2026-01-01T08:00:00Z"),
                utc("2026-01-01T09:00:00Z"),
                utc("2026-01-01T10:00:00Z")
            ]
        );
        assert_eq!(p.next_fire_at, Some(utc("2026-01-01T11:00:00Z")));
    }

    proptest::proptest! {
        /// Whatever a client sends as a cron, parsing and finding the next
        /// firings answer (an error or times in order), never panic.
        #[test]
        fn any_cron_text_parses_or_is_refused_without_a_panic(
            cron in "[0-9*/,LW#?A-Z -]{0,30}",
        ) {
            if let Ok(spec) = CronSpec::parse(&cron, "Europe/Berlin") {
                let times = spec.upcoming(utc("2026-03-29T00:00:00Z"), 3);
                proptest::prop_assert!(times.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }

    #[test]
    fn instance_ids_name_the_schedule_and_the_firing_in_utc() {
        assert_eq!(
            instance_id("nightly", utc("2026-03-29T03:00:00+02:00")),
            "sched:nightly:2026-03-29T01:00:00Z"
        );
    }
}
