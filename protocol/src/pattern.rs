//! Room patterns of tokens (`rooms`, `read`): whole-name globs where `*` matches any run.

/// Whole-name glob match where `*` matches any run of characters (including none).
///
/// Greedy two-pointer matching with backtracking to the last `*`: linear in practice and
/// O(len(pattern) * len(name)) in the worst case, with names capped at 128 characters.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "general"));
        assert!(pattern_matches("*", ""));
        assert!(pattern_matches("team-*", "team-"));
        assert!(pattern_matches("team-*", "team-blue"));
        assert!(!pattern_matches("team-*", "team"));
        assert!(!pattern_matches("team-*", "Team-blue"), "case-sensitive");
        assert!(!pattern_matches("general", "general2"), "whole name");
        assert!(!pattern_matches("general", "xgeneral"));
        assert!(pattern_matches("a*b*c", "a-x-b-y-c"));
        assert!(!pattern_matches("a*b*c", "a-x-c-y-b"));
        assert!(pattern_matches("*-log", "x-log-log"));
        assert!(pattern_matches("**", "abc"));
    }
}
