//! A session's joined rooms and their cursors: a vector sorted by room name.
//!
//! Every idle connection holds one, most with one room or a few: a `HashMap` kept 4 buckets
//! for a single room (about 160 bytes), this keeps exactly what is joined (32 bytes a room).
//! Lookups (one per live delivery) are a binary search, as cheap as hashing a room name for
//! the few rooms of a typical connection and O(log n) up to the rooms-per-connection limit;
//! joins and leaves (rare) move the entries after the room's place.

use std::sync::Arc;

use super::cursor::Cursor;

#[derive(Default)]
pub(super) struct Rooms(Vec<(Arc<str>, Cursor)>);

impl Rooms {
    fn find(&self, room: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(name, _)| name.as_ref().cmp(room))
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// The name a joined room is kept under.
    pub(super) fn key(&self, room: &str) -> Option<&Arc<str>> {
        let at = self.find(room).ok()?;
        Some(&self.0[at].0)
    }

    pub(super) fn get_mut(&mut self, room: &str) -> Option<&mut Cursor> {
        let at = self.find(room).ok()?;
        Some(&mut self.0[at].1)
    }

    /// Joins `room` at `cursor`, or moves the cursor of a room already joined.
    pub(super) fn insert(&mut self, room: Arc<str>, cursor: Cursor) {
        match self.find(&room) {
            Ok(at) => self.0[at].1 = cursor,
            Err(at) => {
                // Exactly one more: joins are rare, and the room is held for the connection's
                // life.
                self.0.reserve_exact(1);
                self.0.insert(at, (room, cursor));
            }
        }
    }

    /// Leaves `room`; `None` if it was not joined.
    pub(super) fn remove(&mut self, room: &str) -> Option<Cursor> {
        let at = self.find(room).ok()?;
        let (_, cursor) = self.0.remove(at);
        if self.0.capacity() > 2 * self.0.len() {
            self.0.shrink_to_fit();
        }
        Some(cursor)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(room, _)| room)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Cursor> {
        self.0.iter().map(|(_, cursor)| cursor)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Cursor)> {
        self.0.iter().map(|(room, cursor)| (room, cursor))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&Arc<str>, &mut Cursor)> {
        self.0.iter_mut().map(|(room, cursor)| (&*room, cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn joins_rejoins_and_leaves_keep_one_sorted_entry_per_room() {
        let mut rooms = Rooms::default();
        for name in ["b", "a", "c", "b"] {
            rooms.insert(room(name), Cursor::new(1, 1));
        }
        assert_eq!(rooms.len(), 3);
        let names: Vec<&str> = rooms.keys().map(|r| r.as_ref()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // A rejoin moves the cursor and adds no entry.
        rooms.insert(room("b"), Cursor::new(5, 9));
        assert_eq!(rooms.len(), 3);
        assert_eq!(
            rooms.get_mut("b").map(|c| (c.sent(), c.target())),
            Some((5, 9))
        );
        assert!(rooms.key("c").is_some());
        assert!(rooms.remove("c").is_some());
        assert!(rooms.remove("c").is_none());
        assert!(rooms.key("c").is_none());
        assert!(rooms.get_mut("zz").is_none());
        assert_eq!(rooms.values().count(), 2);
        assert_eq!(rooms.iter().count(), 2);
    }

    #[test]
    fn holds_exactly_what_is_joined() {
        let mut rooms = Rooms::default();
        rooms.insert(room("only"), Cursor::new(0, 0));
        assert_eq!(
            rooms.0.capacity(),
            1,
            "one room, one entry: no spare buckets"
        );
        for i in 0..100 {
            rooms.insert(room(&format!("r{i}")), Cursor::new(0, 0));
        }
        for i in 0..95 {
            rooms.remove(&format!("r{i}"));
        }
        assert_eq!(rooms.len(), 6);
        assert!(rooms.0.capacity() <= 12, "leaving gives the room back");
    }
}
