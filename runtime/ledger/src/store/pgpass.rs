//! The password a PostgreSQL password file gives a connection, as libpq (and so the sqlx pool)
//! reads it, for the cached-path session, which does not connect through sqlx.
//!
//! The file is `PGPASSFILE` (unless empty), else `~/.pgpass`. Each line is
//! `host:port:database:user:password`; a bare `*` in the first four fields matches anything,
//! `\:` and `\\` escape (an escaped `\*` is a literal star), the password ends at the next
//! unescaped `:`, and a line starting with `#` is a comment. The first matching line wins. A
//! file that group or others may read is ignored (with a warning), as libpq does.

use std::path::{Path, PathBuf};

/// The password for this connection from the password file, if any.
pub(crate) fn lookup(host: &str, port: u16, database: Option<&str>, user: &str) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .filter(|file| !file.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".pgpass")))?;
    // Without a database the server uses the user's name; match it as libpq does.
    from_file(&path, host, port, database.unwrap_or(user), user)
}

fn from_file(path: &Path, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let contents = match std::fs::read_to_string(path) {
        Ok(contents) => contents,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "password file not read");
            return None;
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                           "password file ignored: group or others may read it (chmod 0600)");
            return None;
        }
    }
    find(&contents, host, &port.to_string(), database, user)
}

fn find(contents: &str, host: &str, port: &str, database: &str, user: &str) -> Option<String> {
    let wanted = [host, port, database, user];
    contents
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(fields)
        .find(|fields| {
            fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, value)| field.any || field.text == value)
        })
        .map(|[.., password]| password.text)
}

/// One field of a line: its unescaped text, and whether it was a bare `*`.
#[derive(Debug, PartialEq)]
struct Field {
    text: String,
    any: bool,
}

/// The five fields of a line; `None` for a line with fewer. The password ends at the next
/// unescaped `:`, as in libpq.
fn fields(line: &str) -> Option<[Field; 5]> {
    let mut raw: Vec<(String, bool)> = vec![(String::new(), false)];
    let mut chars = line.trim_end_matches('\r').chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let (text, escaped) = raw.last_mut()?;
                text.push(chars.next().unwrap_or('\\'));
                *escaped = true;
            }
            ':' if raw.len() == 5 => break,
            ':' => raw.push((String::new(), false)),
            c => raw.last_mut()?.0.push(c),
        }
    }
    let fields: Vec<Field> = raw
        .into_iter()
        .map(|(text, escaped)| Field {
            any: text == "*" && !escaped,
            text,
        })
        .collect();
    fields.try_into().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FILE: &str = "# comment:*:*:*:nope\n\
                        db.internal:5432:ledger:spendguard:first\n\
                        db.internal:*:*:spendguard:second\n\
                        \\*:*:*:*:literal-star\n\
                        *:*:*:*:any\\:thing\\\\\n\
                        short:line\n";

    #[test]
    fn the_first_matching_line_wins_and_escapes_are_undone() {
        let at = |host, port, db, user| find(FILE, host, port, db, user);
        assert_eq!(
            at("db.internal", "5432", "ledger", "spendguard").as_deref(),
            Some("first")
        );
        assert_eq!(
            at("db.internal", "6432", "ledger", "spendguard").as_deref(),
            Some("second")
        );
        assert_eq!(
            at("other", "5432", "ledger", "spendguard").as_deref(),
            Some("any:thing\\")
        );
        assert_eq!(find("# only a comment:*:*:*:x\n", "h", "1", "d", "u"), None);
        assert_eq!(
            at("*", "5432", "ledger", "spendguard").as_deref(),
            Some("literal-star"),
            "an escaped star is a literal"
        );
        assert_eq!(
            fields("h:p:d:u:pass:extra")
                .map(|[.., p]| p.text)
                .as_deref(),
            Some("pass"),
            "the password ends at an unescaped colon"
        );
        assert_eq!(fields("short:line"), None);
    }

    #[test]
    fn a_file_others_may_read_is_ignored() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "h:5432:d:u:secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            from_file(&path, "h", 5432, "d", "u").as_deref(),
            Some("secret")
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(from_file(&path, "h", 5432, "d", "u"), None);
        assert_eq!(
            from_file(&dir.path().join("absent"), "h", 5432, "d", "u"),
            None
        );
    }
}
