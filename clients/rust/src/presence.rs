//! Presence bookkeeping of one room (v1.1), without I/O: the set of users present, or only their
//! number in a very large room (this server's extension: `presence_count` in `joined`, `count`
//! and `users` in `presence` frames; see docs/protocol.md "Presence"). Every function returns
//! the change to report, or `None` when nothing changed.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::types::{Presence, PresenceChange};

/// Who is present: the set, or (`users: None`) only the count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PresenceState {
    pub users: Option<BTreeSet<String>>,
    pub count: u64,
}

/// A `presence` frame (every field but `room` optional).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PresenceFrame {
    pub room: String,
    #[serde(default)]
    pub joined: Vec<String>,
    #[serde(default)]
    pub left: Vec<String>,
    pub count: Option<u64>,
    pub users: Option<Vec<String>>,
}

impl PresenceState {
    /// What a `joined` carries: the list, else the count, else nothing (a server without
    /// presence, or presence not asked for).
    pub fn from_joined(list: Option<&[String]>, count: Option<u64>) -> Option<PresenceState> {
        match (list, count) {
            (Some(list), _) => Some(PresenceState::of(list)),
            (None, Some(count)) => Some(PresenceState { users: None, count }),
            (None, None) => None,
        }
    }

    fn of(list: &[String]) -> PresenceState {
        let users: BTreeSet<String> = list.iter().cloned().collect();
        let count = users.len() as u64;
        PresenceState {
            users: Some(users),
            count,
        }
    }

    pub fn view(&self) -> Presence {
        Presence {
            users: self.users.as_ref().map(|u| u.iter().cloned().collect()),
            count: self.count,
        }
    }

    fn change(&self, room: &str, joined: Vec<String>, left: Vec<String>) -> PresenceChange {
        let Presence { users, count } = self.view();
        PresenceChange {
            room: room.to_owned(),
            joined,
            left,
            users,
            count,
        }
    }
}

/// Replaces `prev` (`None` before the first `joined`) by `next` (a new `joined`, or a full
/// `users` list): who left meanwhile is reported as left, who arrived as joined. Coming from
/// count-only mode, everyone listed counts as joined.
pub(crate) fn replace(
    room: &str,
    prev: Option<&PresenceState>,
    next: &PresenceState,
) -> Option<PresenceChange> {
    let before = prev.and_then(|p| p.users.as_ref());
    let joined: Vec<String> = match &next.users {
        Some(users) => users
            .iter()
            .filter(|u| !before.is_some_and(|b| b.contains(*u)))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let left: Vec<String> = match before {
        Some(b) => b
            .iter()
            .filter(|u| !next.users.as_ref().is_some_and(|n| n.contains(*u)))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    if prev == Some(next) {
        return None;
    }
    Some(next.change(room, joined, left))
}

/// Applies a `presence` frame to `state`; the change, if any.
pub(crate) fn apply(
    room: &str,
    state: &mut PresenceState,
    f: PresenceFrame,
) -> Option<PresenceChange> {
    if let Some(list) = f.users {
        // A full list: the room became small again.
        let next = PresenceState::of(&list);
        let change = replace(room, Some(state), &next);
        *state = next;
        return change;
    }
    if let Some(count) = f.count {
        // A very large room: from now on only the number is tracked.
        let next = PresenceState { users: None, count };
        if *state == next {
            return None;
        }
        *state = next;
        return Some(state.change(room, f.joined, f.left));
    }
    let (joined, left) = match &mut state.users {
        Some(users) => {
            let joined: Vec<String> = f
                .joined
                .into_iter()
                .filter(|u| users.insert(u.clone()))
                .collect();
            let left: Vec<String> = f.left.into_iter().filter(|u| users.remove(u)).collect();
            state.count = users.len() as u64;
            (joined, left)
        }
        None => {
            // Count-only: a delta cannot be checked against a set; pass it on as it is.
            state.count = (state.count + f.joined.len() as u64).saturating_sub(f.left.len() as u64);
            (f.joined, f.left)
        }
    };
    if joined.is_empty() && left.is_empty() {
        return None;
    }
    Some(state.change(room, joined, left))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn delta(joined: &[&str], left: &[&str]) -> PresenceFrame {
        PresenceFrame {
            joined: names(joined),
            left: names(left),
            ..PresenceFrame::default()
        }
    }

    #[test]
    fn deltas_change_the_set_and_report_only_real_changes() {
        let mut s = PresenceState::from_joined(Some(&names(&["bob", "alice"])), None).unwrap();
        assert_eq!(s.view().users, Some(names(&["alice", "bob"])));
        let c = apply("r", &mut s, delta(&["carol", "alice"], &["bob", "zed"])).unwrap();
        assert_eq!((c.joined, c.left), (names(&["carol"]), names(&["bob"])));
        assert_eq!((c.users, c.count), (Some(names(&["alice", "carol"])), 2));
        assert!(apply("r", &mut s, delta(&[], &[])).is_none(), "empty lists");
        assert!(
            apply("r", &mut s, delta(&["alice"], &[])).is_none(),
            "present already"
        );
    }

    #[test]
    fn count_only_mode_then_a_full_list() {
        let mut s = PresenceState::from_joined(Some(&names(&["a"])), None).unwrap();
        let count = PresenceFrame {
            count: Some(5000),
            ..PresenceFrame::default()
        };
        let c = apply("r", &mut s, count).unwrap();
        assert_eq!((c.users, c.count), (None, 5000));
        apply("r", &mut s, delta(&["x"], &["y", "z"])).unwrap();
        assert_eq!(s.count, 4999, "deltas move the count");
        let full = PresenceFrame {
            users: Some(names(&["dan", "eve"])),
            ..PresenceFrame::default()
        };
        let c = apply("r", &mut s, full).unwrap();
        assert_eq!(
            (c.joined, c.left, c.count),
            (names(&["dan", "eve"]), vec![], 2)
        );
        let big = PresenceState::from_joined(None, Some(12)).unwrap();
        assert_eq!(big.view().users, None);
        assert!(PresenceState::from_joined(None, None).is_none());
    }

    #[test]
    fn a_new_joined_replaces_the_set_and_reports_the_difference() {
        let before = PresenceState::from_joined(Some(&names(&["a", "b"])), None).unwrap();
        let after = PresenceState::from_joined(Some(&names(&["b", "c"])), None).unwrap();
        let c = replace("r", Some(&before), &after).unwrap();
        assert_eq!((c.joined, c.left), (names(&["c"]), names(&["a"])));
        assert!(replace("r", Some(&after), &after.clone()).is_none());
        let first = replace("r", None, &before).unwrap();
        assert_eq!(first.joined, names(&["a", "b"]));
    }
}
