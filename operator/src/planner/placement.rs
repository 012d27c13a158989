//! Placing replica groups' stages on nodes with enough free GPUs.

use std::collections::BTreeSet;

/// Where one stage of one group runs: (node index, GPUs) pairs; one pair unless the stage's
/// tensor-parallel group spans nodes.
pub(crate) type StagePlace = Vec<(usize, u32)>;

/// Stage slots of `tp` GPUs the nodes offer when a stage stays inside one node.
pub(crate) fn slots(free: &[u32], tp: u32) -> u64 {
    free.iter().map(|&f| u64::from(f / tp)).sum()
}

/// Places `groups` groups of `pp` stages of `tp` GPUs, each stage inside one node, or `None`
/// when the nodes lack room. Each group goes to the node that fits all its remaining stages
/// most tightly; when none does, it takes as many stages as fit on the node with the most free
/// GPUs. Ties go to the lower node index, so the result is deterministic.
pub(crate) fn place_within_nodes(
    free: &[u32],
    tp: u32,
    pp: u32,
    groups: u32,
) -> Option<Vec<Vec<StagePlace>>> {
    if slots(free, tp) < u64::from(pp) * u64::from(groups) {
        return None;
    }
    let mut left: Vec<u32> = free.to_vec();
    let mut by_free: BTreeSet<(u32, usize)> = left
        .iter()
        .enumerate()
        .filter(|(_, f)| **f >= tp)
        .map(|(i, f)| (*f, i))
        .collect();
    let mut out = Vec::with_capacity(groups as usize);
    for _ in 0..groups {
        let mut stages: Vec<StagePlace> = Vec::with_capacity(pp as usize);
        while (stages.len() as u32) < pp {
            let need_stages = pp - stages.len() as u32;
            let need = need_stages.saturating_mul(tp);
            let pick = best_fit(&by_free, need)?;
            by_free.remove(&pick);
            let (f, i) = pick;
            let take = (f / tp).min(need_stages);
            for _ in 0..take {
                stages.push(vec![(i, tp)]);
            }
            left[i] = f - take * tp;
            if left[i] >= tp {
                by_free.insert((left[i], i));
            }
        }
        out.push(stages);
    }
    Some(out)
}

/// Places stages whose `tp` GPUs may span nodes, filling each stage from the nodes with the
/// most free GPUs; `None` when the pool lacks GPUs.
pub(crate) fn place_across_nodes(
    free: &[u32],
    tp: u32,
    pp: u32,
    groups: u32,
) -> Option<Vec<Vec<StagePlace>>> {
    let total: u64 = free.iter().map(|&f| u64::from(f)).sum();
    if total < u64::from(tp) * u64::from(pp) * u64::from(groups) {
        return None;
    }
    let mut left: Vec<u32> = free.to_vec();
    let mut by_free: BTreeSet<(u32, usize)> = left
        .iter()
        .enumerate()
        .filter(|(_, f)| **f > 0)
        .map(|(i, f)| (*f, i))
        .collect();
    let mut out = Vec::with_capacity(groups as usize);
    for _ in 0..groups {
        let mut stages = Vec::with_capacity(pp as usize);
        for _ in 0..pp {
            let mut need = tp;
            let mut place: StagePlace = Vec::new();
            while need > 0 {
                let pick = best_fit(&by_free, need)?;
                by_free.remove(&pick);
                let (f, i) = pick;
                let take = f.min(need);
                place.push((i, take));
                need -= take;
                left[i] = f - take;
                if left[i] > 0 {
                    by_free.insert((left[i], i));
                }
            }
            place.sort_unstable();
            stages.push(place);
        }
        out.push(stages);
    }
    Some(out)
}

/// The node with the fewest free GPUs that still has `need`, or else the one with the most free
/// GPUs; the lowest index among equals, so placement is deterministic.
fn best_fit(by_free: &BTreeSet<(u32, usize)>, need: u32) -> Option<(u32, usize)> {
    by_free.range((need, 0)..).next().copied().or_else(|| {
        let max = by_free.iter().next_back()?.0;
        by_free.range((max, 0)..).next().copied()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_whole_stages_per_node() {
        assert_eq!(slots(&[8, 5, 3], 4), 3);
        assert_eq!(slots(&[8, 5, 3], 1), 16);
    }

    #[test]
    fn stages_spanning_nodes_fill_from_the_fullest_and_reuse_leftovers() {
        // TP 16 on three nodes of 8: two whole nodes, the third untouched.
        assert_eq!(
            place_across_nodes(&[8, 8, 8], 16, 1, 1),
            Some(vec![vec![vec![(0, 8), (1, 8)]]])
        );
        // TP 12 twice: the 4 GPUs the first stage leaves on node 1 serve the second.
        assert_eq!(
            place_across_nodes(&[8, 8, 8], 12, 2, 1),
            Some(vec![vec![vec![(0, 8), (1, 4)], vec![(1, 4), (2, 8)]]])
        );
        assert_eq!(place_across_nodes(&[8, 8, 8], 12, 2, 2), None);
    }

    #[test]
    fn groups_pack_onto_the_tightest_node() {
        // Node 1 has exactly room for a 2-stage group of TP 2.
        let g = place_within_nodes(&[8, 4, 8], 2, 2, 1).expect("fits");
        assert_eq!(g, vec![vec![vec![(1, 2)], vec![(1, 2)]]]);
        // Two groups of TP 8 need two whole nodes.
        let g = place_within_nodes(&[8, 4, 8], 8, 1, 2).expect("fits");
        assert_eq!(g, vec![vec![vec![(0, 8)]], vec![vec![(2, 8)]]]);
        assert_eq!(place_within_nodes(&[8, 4, 8], 8, 1, 3), None);
    }

    #[test]
    fn a_group_spills_over_nodes_when_no_node_holds_it() {
        let g = place_within_nodes(&[4, 4], 2, 3, 1).expect("fits");
        assert_eq!(g, vec![vec![vec![(0, 2)], vec![(0, 2)], vec![(1, 2)]]]);
    }

    #[test]
    fn across_nodes_takes_whole_nodes() {
        let g = place_across_nodes(&[8, 8], 16, 1, 1).expect("fits");
        assert_eq!(g, vec![vec![vec![(0, 8), (1, 8)]]]);
        assert_eq!(place_across_nodes(&[8, 8], 16, 1, 2), None);
    }
}
