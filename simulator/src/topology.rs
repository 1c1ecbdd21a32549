//! The federation's shape: every node's name, tier, parent, alternates and the ancestor
//! a case may skip to, built from a preset (scaled) or an explicit manifest.
//!
//! Nodes are numbered densely (`u32`) so the engine can keep per-node state in
//! vectors; names follow the hierarchical certificate style
//! (`v0017.t0003.c012.ct05.henan.cn`). This module must never create cores or
//! hold any decision: it only says who is linked to whom.

use crate::fastmap::FastMap;
use crate::scenario::{NodeRef, NodeSpec, Preset, ScenarioError, TopologySpec};
use federation_proto::{NodeName, Tier};
use std::collections::HashMap;

/// One node of the topology.
#[derive(Debug, Clone)]
pub struct TopoNode {
    pub name: NodeName,
    pub tier: Tier,
    /// Primary parent, then alternates, then the grandparent (a case may skip a tier).
    pub upstream: Vec<u32>,
}

/// The whole federation.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub nodes: Vec<TopoNode>,
    /// Nodes linked to each node (upstream and downstream), for link-up after faults.
    pub neighbours: Vec<Vec<u32>>,
    /// Where cases are submitted: villages, or leaves of an explicit manifest.
    pub origins: Vec<u32>,
    by_name: FastMap<NodeName, u32>,
}

/// Node counts per tier for the presets at full size.
fn preset_counts(preset: Preset) -> [usize; 7] {
    match preset {
        // village, township, county, city, provincial, national, international
        Preset::Henan => [56_000, 2_400, 157, 18, 1, 1, 1],
        Preset::China => [580_000, 34_000, 2_800, 330, 31, 1, 3],
    }
}

const PREFIX: [&str; 7] = ["v", "t", "c", "ct", "p", "nat", "intl"];

impl Topology {
    pub fn build(spec: &TopologySpec) -> Result<Topology, ScenarioError> {
        match spec.preset {
            Some(p) => Ok(Topology::preset(p, spec.scale, spec.alternates)),
            None => Topology::from_manifest(&spec.nodes),
        }
    }

    /// A preset hierarchy. Tiers below the provincial are scaled (at least one node
    /// each); children are spread evenly over their parents in contiguous blocks.
    pub fn preset(preset: Preset, scale: f64, alternates: u32) -> Topology {
        let full = preset_counts(preset);
        let mut counts = full;
        for c in counts.iter_mut().take(4) {
            *c = ((*c as f64 * scale).round() as usize).max(1);
        }
        // Levels from the top down; names carry the path.
        let mut levels: Vec<Vec<u32>> = vec![Vec::new(); 7];
        let mut nodes: Vec<TopoNode> = Vec::new();
        let mut parent_of: Vec<Option<u32>> = Vec::new();
        let region = match preset {
            Preset::Henan => "henan.cn",
            Preset::China => "cn",
        };
        for level in (0..7).rev() {
            let tier = Tier::ALL[level];
            let n = counts[level];
            for i in 0..n {
                let (parent, name) = if level == 6 {
                    (None, format!("{}{i}.world", PREFIX[level]))
                } else if level == 5 {
                    (Some(levels[6][0]), format!("{}.{region}", PREFIX[level]))
                } else {
                    let above = &levels[level + 1];
                    let p = above[i * above.len() / n];
                    let pname = nodes[p as usize].name.as_str().to_owned();
                    let pname = if level == 4 && preset == Preset::Henan {
                        // The province is the region itself.
                        region.to_owned()
                    } else if level == 4 {
                        format!("p{i:02}.{region}")
                    } else {
                        pname
                    };
                    let name = if level == 4 { pname } else { format!("{}{i:05}.{pname}", PREFIX[level]) };
                    (Some(p), name)
                };
                let idx = nodes.len() as u32;
                nodes.push(TopoNode { name: NodeName::new(name), tier, upstream: Vec::new() });
                parent_of.push(parent);
                levels[level].push(idx);
            }
        }
        // Each node's position within its level (a linear search here made building
        // the `china` preset quadratic: 580,000 villages × 34,000 townships).
        let mut pos_in_level = vec![0usize; nodes.len()];
        for level in &levels {
            for (pos, &idx) in level.iter().enumerate() {
                pos_in_level[idx as usize] = pos;
            }
        }
        // Upstream lists: parent, alternates (neighbouring siblings of the parent), grandparent.
        for level in 0..7 {
            let above = if level < 6 { levels[level + 1].clone() } else { Vec::new() };
            // Positions in `above` of the nodes under each grandparent, ascending.
            let mut under: HashMap<Option<u32>, Vec<usize>> = HashMap::new();
            for (pos, &a) in above.iter().enumerate() {
                under.entry(parent_of[a as usize]).or_default().push(pos);
            }
            for &idx in &levels[level] {
                let Some(parent) = parent_of[idx as usize] else { continue };
                let mut up = vec![parent];
                if level < 6 && above.len() > 1 {
                    let pos = pos_in_level[parent as usize];
                    debug_assert_eq!(above[pos], parent);
                    let grand = parent_of[parent as usize];
                    // Alternates: the parent's neighbours under the same grandparent (a
                    // neighbouring hub), in the order of a walk round the level from
                    // the parent: those after it, then those before it.
                    let siblings = under.get(&grand).map_or(&[][..], Vec::as_slice);
                    let after = siblings.partition_point(|&q| q <= pos);
                    for &q in siblings[after..].iter().chain(&siblings[..after]) {
                        if up.len() > alternates as usize {
                            break;
                        }
                        let cand = above[q];
                        if q != pos && !up.contains(&cand) {
                            up.push(cand);
                        }
                    }
                }
                if let Some(grand) = parent_of[parent as usize]
                    && level < 4
                {
                    up.push(grand);
                }
                nodes[idx as usize].upstream = up;
            }
        }
        Topology::finish(nodes, levels[0].clone())
    }

    /// An explicit federation manifest.
    pub fn from_manifest(specs: &[NodeSpec]) -> Result<Topology, ScenarioError> {
        let mut by_name = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            if by_name.insert(NodeName::new(s.name.clone()), i as u32).is_some() {
                return Err(ScenarioError::Invalid {
                    field: format!("topology.nodes[{i}].name"),
                    reason: format!("`{}` is listed twice", s.name),
                });
            }
        }
        let lookup = |i: usize, field: &str, name: &str, tier: Tier| -> Result<u32, ScenarioError> {
            let idx = *by_name.get(&NodeName::new(name)).ok_or_else(|| ScenarioError::Invalid {
                field: format!("topology.nodes[{i}].{field}"),
                reason: format!("no node is named `{name}`"),
            })?;
            let up_tier = specs[idx as usize].tier;
            if up_tier <= tier {
                return Err(ScenarioError::Invalid {
                    field: format!("topology.nodes[{i}].{field}"),
                    reason: format!("`{name}` is {up_tier}, not above {tier}: cases only go up"),
                });
            }
            Ok(idx)
        };
        let mut nodes = Vec::new();
        let mut has_child = vec![false; specs.len()];
        for (i, s) in specs.iter().enumerate() {
            let mut up = Vec::new();
            if let Some(p) = &s.parent {
                up.push(lookup(i, "parent", p, s.tier)?);
            }
            for a in &s.alternates {
                up.push(lookup(i, "alternates", a, s.tier)?);
            }
            for &u in &up {
                has_child[u as usize] = true;
            }
            nodes.push(TopoNode { name: NodeName::new(s.name.clone()), tier: s.tier, upstream: up });
        }
        let origins = (0..specs.len() as u32).filter(|&i| !has_child[i as usize]).collect();
        Ok(Topology::finish(nodes, origins))
    }

    fn finish(nodes: Vec<TopoNode>, origins: Vec<u32>) -> Topology {
        let mut neighbours = vec![Vec::new(); nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            for &u in &n.upstream {
                neighbours[i].push(u);
                neighbours[u as usize].push(i as u32);
            }
        }
        let by_name = nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i as u32)).collect();
        Topology { nodes, neighbours, origins, by_name }
    }

    pub fn index(&self, name: &NodeName) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Nodes per tier.
    pub fn count_by_tier(&self) -> [usize; 7] {
        let mut c = [0; 7];
        for n in &self.nodes {
            c[n.tier as usize] += 1;
        }
        c
    }

    /// Resolves a fault's node reference.
    pub fn resolve(&self, r: &NodeRef, field: &str) -> Result<u32, ScenarioError> {
        if let Some(name) = &r.name {
            return self.index(&NodeName::new(name.clone())).ok_or_else(|| ScenarioError::Invalid {
                field: field.to_owned(),
                reason: format!("no node is named `{name}`"),
            });
        }
        let Some(tier) = r.tier else {
            return Err(ScenarioError::Invalid { field: field.to_owned(), reason: "give `name` or `tier`".into() });
        };
        self.nodes.iter().enumerate().filter(|(_, n)| n.tier == tier).nth(r.index).map(|(i, _)| i as u32).ok_or_else(
            || ScenarioError::Invalid {
                field: field.to_owned(),
                reason: format!("there is no {tier} node number {}", r.index),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_henan_has_the_issue_counts() {
        let t = Topology::preset(Preset::Henan, 1.0, 1);
        assert_eq!(t.count_by_tier(), [56_000, 2_400, 157, 18, 1, 1, 1]);
        assert_eq!(t.origins.len(), 56_000);
    }

    /// The alternates as first written: a walk round the whole level from the
    /// parent (quadratic, kept here as the reference the fast build must match).
    fn reference_upstreams(t: &Topology, alternates: u32) -> Vec<Vec<u32>> {
        let parent_of: Vec<Option<u32>> = t.nodes.iter().map(|n| n.upstream.first().copied()).collect();
        let mut levels: Vec<Vec<u32>> = vec![Vec::new(); 7];
        for (i, n) in t.nodes.iter().enumerate() {
            levels[n.tier as usize].push(i as u32);
        }
        let mut out = vec![Vec::new(); t.nodes.len()];
        for level in 0..7 {
            let above = if level < 6 { levels[level + 1].clone() } else { Vec::new() };
            for &idx in &levels[level] {
                let Some(parent) = parent_of[idx as usize] else { continue };
                let mut up = vec![parent];
                if level < 6 && above.len() > 1 {
                    let pos = above.iter().position(|&p| p == parent).unwrap_or(0);
                    let grand = parent_of[parent as usize];
                    for k in 1..above.len() {
                        if up.len() > alternates as usize {
                            break;
                        }
                        let cand = above[(pos + k) % above.len()];
                        if parent_of[cand as usize] == grand && !up.contains(&cand) {
                            up.push(cand);
                        }
                    }
                }
                if let Some(grand) = parent_of[parent as usize]
                    && level < 4
                {
                    up.push(grand);
                }
                out[idx as usize] = up;
            }
        }
        out
    }

    #[test]
    fn presets_link_as_the_reference_walk_does() {
        for (preset, scale) in [(Preset::Henan, 0.05), (Preset::China, 0.01), (Preset::China, 0.002)] {
            for alternates in [0, 1, 2] {
                let t = Topology::preset(preset, scale, alternates);
                let reference = reference_upstreams(&t, alternates);
                for (i, n) in t.nodes.iter().enumerate() {
                    assert_eq!(n.upstream, reference[i], "{} ({preset:?}, {alternates} alternates)", n.name);
                }
            }
        }
    }

    #[test]
    fn scaled_preset_keeps_every_tier_and_links_upward() {
        let t = Topology::preset(Preset::Henan, 0.01, 1);
        assert_eq!(t.count_by_tier(), [560, 24, 2, 1, 1, 1, 1]);
        for n in &t.nodes {
            for &u in &n.upstream {
                assert!(t.nodes[u as usize].tier > n.tier, "{} -> {}", n.name, t.nodes[u as usize].name);
            }
            assert_eq!(n.upstream.is_empty(), n.tier == Tier::International);
        }
        // Townships have an alternate county (the neighbour) and the city as last resort.
        let township = t.nodes.iter().find(|n| n.tier == Tier::Township).unwrap();
        let tiers: Vec<Tier> = township.upstream.iter().map(|&u| t.nodes[u as usize].tier).collect();
        assert_eq!(tiers, [Tier::County, Tier::County, Tier::City]);
    }
}
