//! Ref name validity as `git check-ref-format` defines it, plus the
//! receive-pack rule that pushed names live under `refs/`.

/// Checks a full ref name; `Err` carries why it is refused.
pub fn check_ref_name(name: &str) -> Result<(), &'static str> {
    let Some(rest) = name.strip_prefix("refs/") else {
        return Err("ref name must start with refs/");
    };
    if rest.is_empty() {
        return Err("ref name has no component after refs/");
    }
    if name.ends_with('.') {
        return Err("ref name ends with a dot");
    }
    if name.contains("..") {
        return Err("ref name contains ..");
    }
    if name.contains("@{") {
        return Err("ref name contains @{");
    }
    if let Some(c) = name
        .bytes()
        .find(|&b| b < 0x20 || b == 0x7f || b" ~^:?*[\\".contains(&b))
    {
        return Err(if c < 0x20 || c == 0x7f {
            "ref name contains a control character"
        } else {
            "ref name contains a forbidden character"
        });
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err("ref name has an empty component");
        }
        if component.starts_with('.') {
            return Err("ref name component starts with a dot");
        }
        if component.ends_with(".lock") {
            return Err("ref name component ends with .lock");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, bool)] = &[
            ("refs/heads/main", true),
            ("refs/heads/feature/x-1_2", true),
            ("refs/tags/v1.0", true),
            ("refs/heads/ünïcode", true),
            ("refs/heads/a@b", true),
            ("refs/heads/main", true),
            ("HEAD", false),
            ("heads/main", false),
            ("refs/", false),
            ("refs", false),
            ("refs/heads/", false),
            ("refs//heads", false),
            ("refs/heads//x", false),
            ("refs/heads/.hidden", false),
            ("refs/heads/x.lock", false),
            ("refs/heads/x.lock/y", false),
            ("refs/heads/a..b", false),
            ("refs/heads/a.", false),
            ("refs/heads/a b", false),
            ("refs/heads/a~1", false),
            ("refs/heads/a^", false),
            ("refs/heads/a:b", false),
            ("refs/heads/a?", false),
            ("refs/heads/a*", false),
            ("refs/heads/a[", false),
            ("refs/heads/a\\b", false),
            ("refs/heads/a@{1}", false),
            ("refs/heads/a\x01", false),
            ("refs/heads/a\x7f", false),
        ];
        for (name, ok) in cases {
            assert_eq!(check_ref_name(name).is_ok(), *ok, "{name:?}");
        }
    }
}
