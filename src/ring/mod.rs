//! TEMPORARY: replaced by the consistent-hashing ring.
pub fn owned_by(members: &[String], slot_count: u32, me: &str) -> Vec<i32> {
    let mut m: Vec<&String> = members.iter().collect();
    m.sort();
    m.dedup();
    let Some(pos) = m.iter().position(|x| x.as_str() == me) else {
        return vec![];
    };
    (0..slot_count as i32)
        .filter(|s| (*s as usize) % m.len() == pos)
        .collect()
}
