//! Membership in-process: slots split between members, one maintenance
//! holder, and a clean leave hands everything over.

use std::time::Duration;

use crate::{wait_until, TestDb, TestNode};

async fn owners(client: &tokio_postgres::Client) -> Vec<(i32, Option<String>)> {
    client
        .query(
            "SELECT slot, owner FROM stead.slot_owners ORDER BY slot",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_the_slots_and_hand_them_over_on_leave() {
    let db = TestDb::new().await;
    let mut a = TestNode::config(&db);
    a.name = "member-a".into();
    let mut b = TestNode::config(&db);
    b.name = "member-b".into();
    let node_a = TestNode::start_with(a).await;
    let node_b = TestNode::start_with(b).await;
    let client = db.client().await;

    // Both members own slots, every slot has exactly one owner.
    wait_until(
        "two members own all 256 slots",
        Duration::from_secs(20),
        || {
            let client = &client;
            async move {
                let o = owners(client).await;
                let a = o
                    .iter()
                    .filter(|(_, m)| m.as_deref() == Some("member-a"))
                    .count();
                let b = o
                    .iter()
                    .filter(|(_, m)| m.as_deref() == Some("member-b"))
                    .count();
                o.len() == 256 && a + b == 256 && a > 64 && b > 64
            }
        },
    )
    .await;
    let holders: Vec<String> = client
        .query(
            "SELECT holder FROM stead.duty_holders WHERE duty = 'maintenance'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        holders.len(),
        1,
        "exactly one maintenance holder: {holders:?}"
    );

    // The API shows the same split.
    let (status, cluster) = node_a.call("GET", "/v1/cluster", None).await;
    assert_eq!(status, 200, "{cluster}");
    let total: usize = cluster["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["slots"].as_array().unwrap().len())
        .sum();
    assert_eq!(total, 256, "{cluster}");
    assert_eq!(cluster["unowned_slots"].as_array().unwrap().len(), 0);

    // A clean leave: the other member takes every slot and the duty.
    node_a.shutdown().await;
    wait_until(
        "member-b owns every slot and the duty",
        Duration::from_secs(20),
        || {
            let client = &client;
            async move {
                let o = owners(client).await;
                let duty: Vec<Option<String>> = client
                    .query("SELECT holder FROM stead.duty_holders", &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                o.len() == 256
                    && o.iter().all(|(_, m)| m.as_deref() == Some("member-b"))
                    && duty == vec![Some("member-b".to_string())]
            }
        },
    )
    .await;
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.members WHERE name = 'member-a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a member that leaves removes its row");
    node_b.shutdown().await;
}
