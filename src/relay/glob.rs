//! Redis's glob patterns (KEYS, SCAN MATCH, CONFIG GET): `*`, `?`, `[abc]`, `[^a-z]`, `\x`.
//!
//! Matched with backtracking to the last `*` only, so a hostile pattern such as
//! `a*a*a*a*b` costs at most pattern length times text length, never exponential time.

/// One pattern item that matches exactly one byte, or a star.
enum Token<'a> {
    Star,
    Any,
    Byte(u8),
    /// A bracket class: its body (between `[` or `[^` and `]`) and whether it is negated.
    Class(&'a [u8], bool),
}

fn tokens(p: &[u8]) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'*' => {
                if !matches!(out.last(), Some(Token::Star)) {
                    out.push(Token::Star);
                }
            }
            b'?' => out.push(Token::Any),
            b'\\' if i + 1 < p.len() => {
                i += 1;
                out.push(Token::Byte(p[i]));
            }
            b'[' => {
                let mut j = i + 1;
                let negate = p.get(j) == Some(&b'^');
                if negate {
                    j += 1;
                }
                let start = j;
                // As in Redis, an unterminated class runs to the end of the pattern.
                while j < p.len() && p[j] != b']' {
                    if p[j] == b'\\' && j + 1 < p.len() {
                        j += 1;
                    }
                    j += 1;
                }
                out.push(Token::Class(&p[start..j.min(p.len())], negate));
                i = j;
            }
            c => out.push(Token::Byte(c)),
        }
        i += 1;
    }
    out
}

fn class_matches(body: &[u8], c: u8) -> bool {
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\\' && i + 1 < body.len() {
            if body[i + 1] == c {
                return true;
            }
            i += 2;
        } else if i + 2 < body.len() && body[i + 1] == b'-' {
            let (lo, hi) = (body[i].min(body[i + 2]), body[i].max(body[i + 2]));
            if (lo..=hi).contains(&c) {
                return true;
            }
            i += 3;
        } else {
            if body[i] == c {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// Whether `text` matches the glob `pattern`.
pub(crate) fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let toks = tokens(pattern);
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let ok = match toks.get(p) {
            Some(Token::Star) => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(Token::Any) => true,
            Some(Token::Byte(b)) => *b == text[t],
            Some(Token::Class(body, neg)) => class_matches(body, text[t]) != *neg,
            None => false,
        };
        if ok {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    toks[p..].iter().all(|tk| matches!(tk, Token::Star))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn patterns_match_like_redis() {
        let yes = [
            ("*", ""),
            ("*", "anything"),
            ("tube:*", "tube:{a}:stream"),
            ("h?llo", "hello"),
            ("h[ae]llo", "hallo"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("h[b-a]llo", "hallo"),
            ("h\\*llo", "h*llo"),
            ("tube:\\{a\\}:*", "tube:{a}:meta"),
            ("*:stream", "tube:{x}:stream"),
            ("a*b*c", "aXbYc"),
            ("a*", "a"),
        ];
        for (p, t) in yes {
            assert!(matches(p.as_bytes(), t.as_bytes()), "{p} should match {t}");
        }
        let no = [
            ("h?llo", "hllo"),
            ("h[^e]llo", "hello"),
            ("h[a-b]llo", "hcllo"),
            ("tube:*", "other"),
            ("a*b*c", "aXbY"),
            ("", "a"),
            ("abc", "ab"),
        ];
        for (p, t) in no {
            assert!(
                !matches(p.as_bytes(), t.as_bytes()),
                "{p} should not match {t}"
            );
        }
    }

    #[test]
    fn hostile_patterns_stay_fast() {
        let text = "a".repeat(10_000);
        let pattern = "a*".repeat(50) + "b";
        let started = std::time::Instant::now();
        assert!(!matches(pattern.as_bytes(), text.as_bytes()));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
