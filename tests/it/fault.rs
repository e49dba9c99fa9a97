//! High availability under faults, with real `stead serve` processes under a
//! steady load (harness in `fault_harness.rs`): a worker killed with
//! `kill -9`, frozen with SIGSTOP past its TTL, cut off from PostgreSQL by a
//! blackholing proxy; PostgreSQL itself restarted (fast and immediate), and
//! failed over to a synchronous standby; a worker joining. Each test prints how long the slots took to move (within
//! generous sanity limits only: the figures the README quotes come from
//! `stead bench --failover`), and checks at the end from the database that
//! every acknowledged instance completed, that no step result was recorded
//! twice, that every history is gapless, and (sampled all along) that no
//! slot was ever held by two members at once and that every transition was
//! made by the member holding its slot.
//!
//! The tests run one at a time (each runs four processes on a small machine).

use std::time::{Duration, Instant};

use crate::fault_harness::{
    acked_completed, check_invariants, diagnose_stall, measure, median_and_worst, port_of,
    stop_and_check, wait_all_completed, with_port, Load, PrivatePg, Probe, Proxy, ReplicatedPg,
    Sampler, Workers, TTL,
};
use crate::harness::SANITY_LIMIT;
use crate::{wait_until, TestDb};

/// Instances started per second by each test's load driver.
const RATE: u32 = 30;

/// One fault test at a time: each runs four processes.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

async fn start_workers(db_url: &str, names: &[String]) -> Workers {
    let specs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), db_url)).collect();
    Workers::start(&specs).await
}

/// A probe of the database at `url` and its slot count, once `all` share
/// the slots.
async fn balanced(url: &str, all: &[String]) -> (Probe, i64) {
    let probe = Probe::new(url);
    let slots = probe.slot_count().await;
    wait_until("the members share the slots", SANITY_LIMIT, || {
        probe.balanced(all, slots)
    })
    .await;
    (probe, slots)
}

/// Let the load run (time passing, not synchronisation).
async fn run_load_for(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Waits until every worker is a member again with the slots shared
/// (measured from `t`: returned), answers `/readyz`, and the load has more
/// than `acked` acknowledged starts.
async fn recovers(
    what: &str,
    t: Instant,
    (workers, probe, slots): (&Workers, &Probe, i64),
    (load, acked): (&Load, usize),
) -> Duration {
    let all = workers.names();
    let recovered = measure(what, t, Duration::from_secs(40), || {
        probe.balanced(&all, slots)
    })
    .await;
    workers.wait_ready(&all, Duration::from_secs(20)).await;
    wait_until(
        "starts are acknowledged again",
        Duration::from_secs(20),
        || async { load.acked() > acked },
    )
    .await;
    recovered
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_worker_its_slots_move_to_the_survivors() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let all = names("k", 3);
    let mut workers = start_workers(&db.url, &all).await;
    let (probe, slots) = balanced(&db.url, &all).await;
    let sampler = Sampler::start(&db.url, workers.targets.clone());
    let load = Load::start(workers.targets.clone(), "kill", RATE);

    let mut times = Vec::new();
    for round in 0..3 {
        run_load_for(Duration::from_secs(1)).await;
        let victim = all[round].clone();
        let survivors = workers.others(&victim);
        let t = Instant::now();
        workers.kill9(&victim);
        let took = measure(
            &format!("the survivors {survivors:?} own every slot after kill -9 of {victim}"),
            t,
            Duration::from_secs(15),
            || probe.all_owned_by(&survivors, slots),
        )
        .await;
        println!("failover after kill -9 of {victim}: {}", secs(took));
        times.push(took);

        workers.respawn(&victim).await;
        let t = Instant::now();
        wait_until(
            "the respawned worker rejoins and the slots rebalance",
            Duration::from_secs(20),
            || probe.balanced(&all, slots),
        )
        .await;
        println!("{victim} respawned and rebalanced in {}", secs(t.elapsed()));
    }
    run_load_for(Duration::from_secs(1)).await;

    let report = stop_and_check(load, sampler, &probe, Duration::from_secs(30)).await;

    let (median, worst) = median_and_worst(&times);
    println!(
        "failover after kill -9 over {} kills: median {}, worst {}",
        times.len(),
        secs(median),
        secs(worst)
    );
    assert!(report.acked.len() >= 100, "too little load: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_ttl_moves_the_slots_and_the_worker_rejoins_after_sigcont() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let all = names("s", 3);
    let workers = start_workers(&db.url, &all).await;
    let (probe, slots) = balanced(&db.url, &all).await;
    let sampler = Sampler::start(&db.url, workers.targets.clone());
    let load = Load::start(workers.targets.clone(), "stop", RATE);
    run_load_for(Duration::from_secs(1)).await;

    let frozen = all[2].clone();
    let others = workers.others(&frozen);
    let t = Instant::now();
    workers.freeze(&frozen);
    let took = measure(
        &format!("{others:?} own every slot while {frozen} is stopped"),
        t,
        TTL + Duration::from_secs(10),
        || probe.all_owned_by(&others, slots),
    )
    .await;
    println!("failover after SIGSTOP: {}", secs(took));

    // Stay frozen for three TTLs (time passing, under load), then resume.
    tokio::time::sleep((TTL * 3).saturating_sub(t.elapsed())).await;
    let stopped_for = t.elapsed();
    let t_cont = Instant::now();
    workers.thaw(&frozen);
    let all_ref = &all;
    let frozen_ref = &frozen;
    let probe_ref = &probe;
    let rejoined = measure(
        &format!("{frozen} is alive again and owns slots"),
        t_cont,
        Duration::from_secs(20),
        || async move {
            let members = probe_ref.members().await?;
            match members.get(frozen_ref) {
                Some((true, n)) if *n > 0 => probe_ref.balanced(all_ref, slots).await,
                other => Err(format!("{frozen_ref}: {other:?}")),
            }
        },
    )
    .await;
    println!(
        "{frozen} stopped for {}, rejoined and owns slots again {} after SIGCONT",
        secs(stopped_for),
        secs(rejoined)
    );
    run_load_for(Duration::from_secs(1)).await;

    let report = stop_and_check(load, sampler, &probe, Duration::from_secs(30)).await;
    assert!(report.acked.len() >= 100, "too little load: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_worker_loses_its_slots_and_the_others_complete_everything() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let proxy = Proxy::start(port_of(&db.url)).await;
    let via_proxy = with_port(&db.url, proxy.port);
    let all = names("b", 3);
    let cut = all[2].clone();
    let specs = [
        (all[0].as_str(), db.url.as_str()),
        (all[1].as_str(), db.url.as_str()),
        (cut.as_str(), via_proxy.as_str()),
    ];
    let workers = Workers::start(&specs).await;
    let (probe, slots) = balanced(&db.url, &all).await;
    let sampler = Sampler::start(&db.url, workers.targets.clone());
    let load = Load::start(workers.targets.clone(), "hole", RATE);
    run_load_for(Duration::from_secs(1)).await;

    let others = workers.others(&cut);
    workers.targets.set_up(&cut, false);
    // Cut it off in the middle of one of its transactions that holds row
    // locks (an advance batch), as a partition under load does now and
    // then: a partitioned worker must not hold up anyone's work. Its link
    // is made slow (10ms each way) first so that, once PostgreSQL shows
    // the transaction waiting for the worker, the blackhole reliably lands
    // before the worker's next message does.
    proxy.set_latency(Duration::from_millis(10));
    let in_tx = format!("stead {cut}");
    let in_tx = &in_tx;
    let probe_ref = &probe;
    let in_locking_tx = || async move {
        probe_ref
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 \
                 AND state = 'idle in transaction' AND backend_xid IS NOT NULL",
                &[in_tx],
            )
            .await
            .is_ok_and(|r| !r.is_empty())
    };
    // The cut landed mid-transaction if, once the proxy holds everything,
    // the server still shows that session inside it. A message already
    // through the proxy may end the transaction first: then heal and aim
    // again.
    let mut aims = 0;
    let t = loop {
        aims += 1;
        assert!(aims <= 50, "could not cut {cut} off inside a transaction");
        wait_until(
            &format!("{cut} is inside a transaction holding locks"),
            Duration::from_secs(60),
            in_locking_tx,
        )
        .await;
        let t = Instant::now();
        proxy.blackhole(true);
        if in_locking_tx().await {
            break t;
        }
        proxy.blackhole(false);
    };
    println!("blackholed {cut} inside a transaction holding row locks (aim {aims})");
    let took = measure(
        &format!("{others:?} own every slot while {cut} is blackholed"),
        t,
        TTL + Duration::from_secs(15),
        || probe.all_owned_by(&others, slots),
    )
    .await;
    println!("failover after blackholing {cut}: {}", secs(took));
    run_load_for(Duration::from_secs(1)).await;

    // The other two finish everything while it is still cut off.
    let report = load.stop().await;
    report.print();
    let t_done = Instant::now();
    let deadline = SANITY_LIMIT;
    let stall = loop {
        match acked_completed(&probe, &report.acked).await {
            Ok(()) => break None,
            Err(e) if t_done.elapsed() >= deadline => {
                break Some(format!("{e}\n{}", diagnose_stall(&probe).await))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    match &stall {
        None => println!(
            "with {cut} blackholed the others completed every acknowledged instance {} after \
             the load stopped",
            secs(t_done.elapsed())
        ),
        Some(why) => println!(
            "with {cut} blackholed the others did NOT complete every acknowledged instance \
             within {deadline:?}: {why}"
        ),
    }

    // Heal the partition: it rejoins.
    proxy.blackhole(false);
    workers.targets.set_up(&cut, true);
    let t_heal = Instant::now();
    let rejoined = measure(
        &format!("{cut} rejoins after the blackhole ends"),
        t_heal,
        Duration::from_secs(20),
        || probe.balanced(&all, slots),
    )
    .await;
    println!(
        "{cut} rejoined {} after the blackhole ended",
        secs(rejoined)
    );

    // Starts that hung on it may have committed after all: they complete too.
    wait_all_completed(&probe, &report.acked, Duration::from_secs(30)).await;
    let sampled = sampler.stop().await;
    check_invariants(&probe, &report.acked).await;
    sampled.assert_ok();
    sampled.assert_only_owners_advanced(&probe).await;
    assert!(report.acked.len() >= 60, "too little load: {report:?}");
    assert!(
        stall.is_none(),
        "while {cut} was blackholed the others did not complete every acknowledged instance \
         within {deadline:?}: {}",
        stall.as_deref().unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_fast_and_immediate_workers_recover_by_themselves() {
    let _serial = SERIAL.lock().await;
    let pg = PrivatePg::start().await;
    let all = names("p", 3);
    let workers = start_workers(&pg.url, &all).await;
    let (probe, slots) = balanced(&pg.url, &all).await;
    let sampler = Sampler::start(&pg.url, workers.targets.clone());
    let load = Load::start(workers.targets.clone(), "restart", RATE);

    for mode in ["fast", "immediate"] {
        run_load_for(Duration::from_millis(1500)).await;
        let before = load.acked();
        let t = Instant::now();
        pg.restart(mode).await;
        let server_back = t.elapsed();
        let recovered = recovers(
            &format!("every worker recovers after pg_ctl restart -m {mode}"),
            t,
            (&workers, &probe, slots),
            (&load, before + 10),
        )
        .await;
        println!(
            "pg_ctl restart -m {mode}: server back after {}, members alive with every slot \
             owned after {}, accepting starts after {}",
            secs(server_back),
            secs(recovered),
            secs(t.elapsed())
        );
    }
    run_load_for(Duration::from_secs(1)).await;

    let report = stop_and_check(load, sampler, &probe, Duration::from_secs(40)).await;
    assert!(report.acked.len() >= 100, "too little load: {report:?}");
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_worker_joins_under_load_and_takes_a_quarter_of_the_slots() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let mut all = names("j", 3);
    let mut workers = start_workers(&db.url, &all).await;
    let (probe, slots) = balanced(&db.url, &all).await;
    let sampler = Sampler::start(&db.url, workers.targets.clone());
    let load = Load::start(workers.targets.clone(), "join", RATE);
    run_load_for(Duration::from_secs(2)).await;

    let t = Instant::now();
    workers.add("j4", &db.url).await;
    let spawned = t.elapsed();
    all.push("j4".into());
    let all_ref = &all;
    let probe_ref = &probe;
    let took = measure(
        "j4 owns about a quarter of the slots and every slot is owned",
        t,
        Duration::from_secs(15),
        || async move {
            probe_ref.all_owned_by(all_ref, slots).await?;
            let owners = probe_ref.owners().await?;
            let share = owners.get("j4").copied().unwrap_or(0) as f64 / slots as f64;
            if (0.15..=0.35).contains(&share) {
                Ok(())
            } else {
                Err(format!("j4 holds {share:.2} of the slots: {owners:?}"))
            }
        },
    )
    .await;
    let owners = probe.owners().await.unwrap();
    println!(
        "join: j4 listening after {}, owns {}/{slots} slots {} after it was started ({owners:?})",
        secs(spawned),
        owners.get("j4").copied().unwrap_or(0),
        secs(took)
    );
    run_load_for(Duration::from_secs(2)).await;

    let report = load.stop().await;
    report.print();
    // No fault here: every start was acknowledged.
    assert!(
        report.errors.is_empty(),
        "starts were refused while j4 joined: {report:?}"
    );
    // No instance stalls: all complete soon after the last start.
    let t_done = Instant::now();
    wait_all_completed(&probe, &report.acked, Duration::from_secs(15)).await;
    println!(
        "all completed {} after the load stopped",
        secs(t_done.elapsed())
    );
    let sampled = sampler.stop().await;
    check_invariants(&probe, &report.acked).await;
    sampled.assert_ok();
    sampled.assert_only_owners_advanced(&probe).await;
    let slowest: f64 = probe
        .query(
            "SELECT max(extract(epoch FROM ended_at - created_at))::float8 FROM stead.instances",
            &[],
        )
        .await
        .unwrap()[0]
        .get(0);
    assert!(
        slowest < SANITY_LIMIT.as_secs_f64(),
        "an instance stalled for {slowest:.2}s from start to end while j4 joined"
    );
    assert!(report.acked.len() >= 100, "too little load: {report:?}");
    drop(workers);
}

/// The member holding the maintenance duty, from `stead.duty_holders`.
async fn duty_holder(probe: &Probe) -> Result<String, String> {
    let rows = probe
        .query(
            "SELECT holder FROM stead.duty_holders WHERE duty = 'maintenance'",
            &[],
        )
        .await?;
    match rows.as_slice() {
        [row] => row
            .get::<_, Option<String>>(0)
            .ok_or_else(|| "held by a session that is no member".to_string()),
        other => Err(format!("{} holders", other.len())),
    }
}

/// Ok once `gone` has no members row, one of `others` holds the duty, and
/// `others` own every slot.
async fn duty_and_slots_moved(
    probe: &Probe,
    gone: &str,
    others: &[String],
    slots: i64,
) -> Result<(), String> {
    let members = probe.members().await?;
    if members.contains_key(gone) {
        return Err(format!("{gone} is still a member: {members:?}"));
    }
    let holder = duty_holder(probe).await?;
    if !others.contains(&holder) {
        return Err(format!("the duty is held by {holder}"));
    }
    probe.all_owned_by(others, slots).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maintenance_duty_moves_when_its_holder_is_killed_or_frozen() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let all = names("d", 3);
    let mut workers = start_workers(&db.url, &all).await;
    let (probe, slots) = balanced(&db.url, &all).await;
    let load = Load::start(workers.targets.clone(), "duty", RATE);

    // kill -9 of the holder ends its session; SIGSTOP leaves it, and only
    // the others can remove the holder and end it. Either way the others
    // remove its row, one of them takes the duty, and they take its slots.
    for frozen in [false, true] {
        let holder = duty_holder(&probe).await.expect("a duty holder");
        let others = workers.others(&holder);
        let t = Instant::now();
        if frozen {
            workers.freeze(&holder);
        } else {
            workers.kill9(&holder);
        }
        let took = measure(
            &format!("the duty and the slots of {holder} move (frozen: {frozen})"),
            t,
            SANITY_LIMIT,
            || duty_and_slots_moved(&probe, &holder, &others, slots),
        )
        .await;
        println!(
            "duty moved from {holder} (frozen: {frozen}) in {}",
            secs(took)
        );
        if frozen {
            workers.thaw(&holder);
        } else {
            workers.respawn(&holder).await;
        }
        wait_until("the holder rejoins", SANITY_LIMIT, || {
            probe.balanced(&all, slots)
        })
        .await;
    }

    let report = load.stop().await;
    wait_all_completed(&probe, &report.acked, SANITY_LIMIT).await;
    check_invariants(&probe, &report.acked).await;
    drop(workers);
}

/// A primary with a synchronous streaming standby; every worker is given
/// both hosts with `target_session_attrs=read-write`. Under load the
/// standby is promoted and the old primary stopped as by a crash: each
/// worker finds the new primary by itself, and every acknowledged start
/// survives and completes (synchronous replication: nothing acknowledged
/// was only on the old primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failover_to_a_synchronous_standby_loses_no_acknowledged_start() {
    let _serial = SERIAL.lock().await;
    let pg = ReplicatedPg::start().await;
    let url = pg.url();
    let all = names("f", 3);
    let workers = start_workers(&url, &all).await;
    let (probe, slots) = balanced(&url, &all).await;
    let sampler = Sampler::start(&url, workers.targets.clone());
    let load = Load::start(workers.targets.clone(), "failover", RATE);
    run_load_for(Duration::from_millis(1500)).await;

    let before = load.acked();
    let t = Instant::now();
    pg.fail_over().await;
    let promoted = t.elapsed();
    let recovered = recovers(
        "every worker recovers on the promoted standby",
        t,
        (&workers, &probe, slots),
        (&load, before + 30),
    )
    .await;
    println!(
        "failover: promoted and old primary stopped after {}, members alive with every slot \
         owned after {}, accepting starts after {}",
        secs(promoted),
        secs(recovered),
        secs(t.elapsed())
    );
    let server = probe
        .query("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert_eq!(
        (server[0].get::<_, i32>(0), server[0].get::<_, bool>(1)),
        (i32::from(pg.standby.port), false),
        "the checks read the promoted standby"
    );
    run_load_for(Duration::from_secs(1)).await;

    let report = stop_and_check(load, sampler, &probe, Duration::from_secs(40)).await;
    assert!(report.acked.len() >= 80, "too little load: {report:?}");
    drop(workers);
}
