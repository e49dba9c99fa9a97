//! Graph algorithms for the step dependency graph: cycles are found as
//! strongly connected components, and reported by their shortest cycle.

use std::collections::{HashMap, VecDeque};

/// Tarjan's strongly connected components, iterative (no deep recursion for
/// long chains of steps).
pub(super) fn strongly_connected(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = adj.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next = 0;
    let mut out = Vec::new();
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut calls: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut edge)) = calls.last_mut() {
            if let Some(&w) = adj[v].get(*edge) {
                *edge += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                calls.pop();
                if let Some(&(u, _)) = calls.last() {
                    low[u] = low[u].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut scc = Vec::new();
                    loop {
                        let w = stack.pop().expect("tarjan stack");
                        on_stack[w] = false;
                        scc.push(w);
                        if w == v {
                            break;
                        }
                    }
                    out.push(scc);
                }
            }
        }
    }
    out
}

/// The shortest cycle through `start` inside `scc`, as step indices starting
/// and ending with `start`.
pub(super) fn shortest_cycle(adj: &[Vec<usize>], scc: &[usize], start: usize) -> Vec<usize> {
    let mut member = vec![false; adj.len()];
    for &v in scc {
        member[v] = true;
    }
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in &adj[v] {
            if !member[w] {
                continue;
            }
            if w == start {
                // Walk back from v to start, then read it forwards.
                let mut back = Vec::new();
                let mut cur = v;
                while cur != start {
                    back.push(cur);
                    cur = parent[&cur];
                }
                let mut path = vec![start];
                path.extend(back.into_iter().rev());
                path.push(start);
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    vec![start, start]
}
