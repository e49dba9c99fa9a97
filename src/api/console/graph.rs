//! A workflow's step graph as SVG: one box per step, an arrow from each step
//! to the steps that need it, each box coloured by its step's status. Pure:
//! the page hands it the steps.
//!
//! Layout: a step's row is one more than the deepest step it needs (roots
//! on top), so every arrow points down; a row with more steps than fit
//! across wraps onto further rows.

use maud::{html, Markup};

use crate::model::StepStatus;

/// Box size and spacing, in SVG pixels.
const NODE_W: i64 = 200;
const NODE_H: i64 = 52;
const GAP_X: i64 = 20;
const GAP_Y: i64 = 36;
const PAD: i64 = 8;
/// Most boxes side by side before a row wraps.
const MAX_ACROSS: usize = 6;
/// Characters of a step id shown in its box (the whole id is its tooltip).
const ID_CHARS: usize = 22;
/// Characters of the line under it.
const META_CHARS: usize = 27;

/// One step to draw.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub id: String,
    pub kind: &'static str,
    /// Indices of the steps it needs.
    pub needs: Vec<usize>,
    pub status: StepStatus,
    /// A short line under the kind: "attempt 2", "3/10 done".
    pub note: Option<String>,
    /// Where the box links (a child instance).
    pub link: Option<String>,
}

/// Where each box sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    x: i64,
    y: i64,
}

/// The depth of each step: 0 for one that needs nothing, else one more than
/// the deepest it needs. Needs form no cycle (validation refuses one); a
/// need out of range or on a cycle counts as depth 0 rather than looping.
fn depths(nodes: &[Node]) -> Vec<usize> {
    let mut depth: Vec<Option<usize>> = vec![None; nodes.len()];
    for start in 0..nodes.len() {
        // Iterative depth-first walk; `on_path` guards against a cycle.
        let mut stack = vec![(start, 0usize)];
        let mut on_path = vec![false; nodes.len()];
        while let Some(&(i, next)) = stack.last() {
            if depth[i].is_some() {
                stack.pop();
                continue;
            }
            on_path[i] = true;
            let needs = &nodes[i].needs;
            if let Some(&n) = needs.get(next) {
                stack.last_mut().expect("on the stack").1 += 1;
                if n < nodes.len() && depth[n].is_none() && !on_path[n] {
                    stack.push((n, 0));
                }
                continue;
            }
            let d = needs
                .iter()
                .filter_map(|&n| depth.get(n).copied().flatten())
                .map(|d| d + 1)
                .max()
                .unwrap_or(0);
            depth[i] = Some(d);
            on_path[i] = false;
            stack.pop();
        }
    }
    depth.into_iter().map(|d| d.unwrap_or(0)).collect()
}

/// Each box's place, and the drawing's width and height.
fn layout(nodes: &[Node]) -> (Vec<Place>, i64, i64) {
    let depth = depths(nodes);
    let rows_deep = depth.iter().max().map_or(0, |d| d + 1);
    let mut by_depth: Vec<Vec<usize>> = vec![Vec::new(); rows_deep];
    for (i, &d) in depth.iter().enumerate() {
        by_depth[d].push(i);
    }
    let across = by_depth
        .iter()
        .map(|row| row.len().min(MAX_ACROSS))
        .max()
        .unwrap_or(1)
        .max(1) as i64;
    // A gap each side: room for the arrows that bow around a row.
    let width = (PAD + GAP_X) * 2 + across * NODE_W + (across - 1) * GAP_X;
    let mut places = vec![Place { x: 0, y: 0 }; nodes.len()];
    let mut row = 0i64;
    for group in &by_depth {
        for chunk in group.chunks(MAX_ACROSS) {
            let n = chunk.len() as i64;
            let used = n * NODE_W + (n - 1) * GAP_X;
            let left = (width - used) / 2;
            for (k, &i) in chunk.iter().enumerate() {
                places[i] = Place {
                    x: left + k as i64 * (NODE_W + GAP_X),
                    y: PAD + row * (NODE_H + GAP_Y),
                };
            }
            row += 1;
        }
    }
    let height = PAD * 2 + row.max(1) * NODE_H + (row.max(1) - 1) * GAP_Y;
    (places, width, height)
}

fn shorten(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_string();
    }
    let mut s: String = text.chars().take(chars - 1).collect();
    s.push('…');
    s
}

/// The graph as an inline `<svg>`, labelled `label` for screen readers.
pub(crate) fn svg(nodes: &[Node], label: &str) -> Markup {
    let (places, width, height) = layout(nodes);
    html! {
        svg.graph xmlns="http://www.w3.org/2000/svg" role="img" aria-label=(label)
            width=(width) height=(height) viewBox=(format!("0 0 {width} {height}")) {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"
                    markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" .arrowhead {}
                }
            }
            @for (j, node) in nodes.iter().enumerate() {
                @for &i in node.needs.iter().filter(|&&i| i < nodes.len()) {
                    (edge(places[i], places[j]))
                }
            }
            @for (node, place) in nodes.iter().zip(&places) {
                @if let Some(link) = &node.link {
                    a href=(link) { (node_box(node, *place)) }
                } @else {
                    (node_box(node, *place))
                }
            }
        }
    }
}

fn edge(from: Place, to: Place) -> Markup {
    let (x1, y1) = (from.x + NODE_W / 2, from.y + NODE_H);
    let (x2, y2) = (to.x + NODE_W / 2, to.y);
    let d = if y2 - y1 > NODE_H + GAP_Y {
        // Past a row between: bow out to the source's side, around the
        // boxes of the rows it crosses.
        let clear = NODE_W / 2 + GAP_X / 2;
        let out = if x1 >= x2 { x1 + clear } else { x1 - clear };
        format!(
            "M {x1} {y1} C {x1} {} {out} {} {out} {} S {x2} {} {x2} {y2}",
            y1 + GAP_Y / 2,
            y1 + GAP_Y / 2,
            (y1 + y2) / 2,
            y2 - GAP_Y,
        )
    } else {
        let bend = ((y2 - y1) / 2).max(GAP_Y / 2);
        format!(
            "M {x1} {y1} C {x1} {} {x2} {} {x2} {y2}",
            y1 + bend,
            y2 - bend
        )
    };
    html! { path.edge d=(d) marker-end="url(#arrow)" {} }
}

fn node_box(node: &Node, at: Place) -> Markup {
    let status = node.status.as_str();
    let mut meta = format!("{} · {status}", node.kind);
    if let Some(note) = &node.note {
        meta.push_str(" · ");
        meta.push_str(note);
    }
    html! {
        g class=(format!("node st-{status}")) data-step=(node.id) data-status=(status) {
            title { (node.id) ": " (meta) }
            rect x=(at.x) y=(at.y) width=(NODE_W) height=(NODE_H) rx="6" {}
            text.step-id x=(at.x + 10) y=(at.y + 21) { (shorten(&node.id, ID_CHARS)) }
            text.step-meta x=(at.x + 10) y=(at.y + 40) { (shorten(&meta, META_CHARS)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, needs: &[usize]) -> Node {
        Node {
            id: id.into(),
            kind: "task",
            needs: needs.to_vec(),
            status: StepStatus::Pending,
            note: None,
            link: None,
        }
    }

    #[test]
    fn each_step_sits_below_every_step_it_needs() {
        // a → b, a → c, (b, c) → d: a diamond.
        let nodes = [
            node("a", &[]),
            node("b", &[0]),
            node("c", &[0]),
            node("d", &[1, 2]),
        ];
        assert_eq!(depths(&nodes), [0, 1, 1, 2]);
        let (places, _, _) = layout(&nodes);
        for (j, n) in nodes.iter().enumerate() {
            for &i in &n.needs {
                assert!(places[i].y < places[j].y, "{} above {}", nodes[i].id, n.id);
            }
        }
        assert_eq!(places[1].y, places[2].y);
        assert_ne!(places[1].x, places[2].x);
    }

    #[test]
    fn a_wide_row_wraps_and_a_cycle_does_not_hang() {
        let mut nodes = vec![node("root", &[])];
        nodes.extend((0..20).map(|k| node(&format!("s{k}"), &[0])));
        let (_, width, height) = layout(&nodes);
        let across = MAX_ACROSS as i64;
        assert_eq!(
            width,
            (PAD + GAP_X) * 2 + across * NODE_W + (across - 1) * GAP_X
        );
        // The root's row and four rows of at most six.
        assert_eq!(height, PAD * 2 + 5 * NODE_H + 4 * GAP_Y);
        let cycle = [node("x", &[1]), node("y", &[0]), node("z", &[7])];
        assert_eq!(depths(&cycle).len(), 3);
    }

    #[test]
    fn boxes_carry_their_status_and_text_is_escaped() {
        let mut n = node("<script>", &[]);
        n.status = StepStatus::Failed;
        n.link = Some("/instances/p:child".into());
        let out = svg(&[n], "steps").into_string();
        assert!(out.contains("class=\"node st-failed\""), "{out}");
        assert!(out.contains("href=\"/instances/p:child\""), "{out}");
        assert!(!out.contains("<script>"), "{out}");
        assert!(out.contains("&lt;script&gt;"), "{out}");
    }
}
