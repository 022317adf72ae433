//! Reads `SHOW GRANTS` lines (MariaDB 10.11 and MySQL 8.0/8.4 spell them
//! alike) and answers whether a privilege is held on a database's tables.
//!
//! Only what a `GRANT` line states is read: privileges given through a role
//! (a line `GRANT role TO user`, without `ON`) are reported as roles, not
//! followed; column privileges (`SELECT (col)`) do not count as table ones.
//! Pure code, no connection.

/// What a grant line applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `*.*`
    Global,
    /// `` `db`.* ``; the name is a `LIKE` pattern (`_`, `%`, `\_`).
    Database(String),
    /// `` `db`.`table` ``
    Table(String, String),
}

/// One parsed `GRANT ... ON ... TO ...` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Upper-case privilege names; `ALL PRIVILEGES` is `ALL`.
    pub privileges: Vec<String>,
    pub scope: Scope,
}

/// The grants of one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub grants: Vec<Grant>,
    /// Roles granted to the account (their privileges are not read).
    pub roles: Vec<String>,
}

impl Grants {
    /// Parses every line of `SHOW GRANTS`; a line it cannot read is skipped
    /// (a `PROXY` grant, a password line).
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = Self::default();
        for line in lines {
            match parse_line(line) {
                Some(Parsed::Grant(g)) => out.grants.push(g),
                Some(Parsed::Role(r)) => out.roles.push(r),
                None => {}
            }
        }
        out
    }

    /// Whether `privilege` is held on every table of `tables` in `database`
    /// (by a global, a database or a table grant). Returns the tables it is
    /// missing on: empty when it is held; `tables` empty means "the database
    /// as a whole" and is answered by global and database grants only.
    pub fn missing_on(&self, privilege: &str, database: &str, tables: &[String]) -> Vec<String> {
        let held = |g: &Grant| g.privileges.iter().any(|p| p == privilege || p == "ALL");
        let whole = self.grants.iter().any(|g| {
            held(g)
                && match &g.scope {
                    Scope::Global => true,
                    Scope::Database(pattern) => like(pattern, database),
                    Scope::Table(..) => false,
                }
        });
        if whole {
            return Vec::new();
        }
        if tables.is_empty() {
            return vec![format!("`{database}`.*")];
        }
        let missing: Vec<String> = tables
            .iter()
            .filter(|t| {
                !self.grants.iter().any(|g| {
                    held(g)
                        && matches!(&g.scope, Scope::Table(db, table) if db == database && table == *t)
                })
            })
            .map(|t| format!("`{database}`.`{t}`"))
            .collect();
        if missing.len() == tables.len() {
            vec![format!("`{database}`.*")]
        } else {
            missing
        }
    }
}

enum Parsed {
    Grant(Grant),
    Role(String),
}

fn parse_line(line: &str) -> Option<Parsed> {
    let rest = line.trim().strip_prefix("GRANT ")?;
    let Some(on) = find_outside_quotes(rest, " ON ") else {
        // `GRANT role TO user`: a role.
        let to = find_outside_quotes(rest, " TO ")?;
        return Some(Parsed::Role(unquote(rest[..to].trim())));
    };
    let privileges = split_outside_parens(&rest[..on])
        .into_iter()
        .filter(|p| !p.contains('('))
        .map(|p| {
            let p = p.trim().to_ascii_uppercase();
            if p == "ALL PRIVILEGES" {
                "ALL".to_owned()
            } else {
                p
            }
        })
        .collect();
    let after = &rest[on + 4..];
    let to = find_outside_quotes(after, " TO ")?;
    let object = after[..to].trim();
    // `PROCEDURE db.p` / `FUNCTION db.f` / `PROXY ON`: not table privileges.
    if object.starts_with("PROCEDURE ") || object.starts_with("FUNCTION ") {
        return None;
    }
    let object = object.strip_prefix("TABLE ").unwrap_or(object);
    let dot = find_outside_quotes(object, ".")?;
    let (db, table) = (object[..dot].trim(), object[dot + 1..].trim());
    let scope = match (db, table) {
        ("*", "*") => Scope::Global,
        (db, "*") => Scope::Database(unquote(db)),
        (db, table) => Scope::Table(unquote(db), unquote(table)),
    };
    Some(Parsed::Grant(Grant { privileges, scope }))
}

/// The byte offset of `needle` in `s` outside backquotes and single quotes.
fn find_outside_quotes(s: &str, needle: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '`' || c == '\'' => quote = Some(c),
            None if s[i..].starts_with(needle) => return Some(i),
            None => {}
        }
    }
    None
}

/// Splits a privilege list at commas outside parentheses.
fn split_outside_parens(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    let inner = s
        .strip_prefix('`')
        .and_then(|s| s.strip_suffix('`'))
        .or_else(|| s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(s);
    inner.replace("``", "`")
}

/// SQL `LIKE` as grant database names use it: `%` any run, `_` one
/// character, `\` escapes the next.
fn like(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('%', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('_', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some(('\\', rest)) if !rest.is_empty() => {
                n.first() == Some(&rest[0]) && go(&rest[1..], &n[1..])
            }
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    go(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<String> {
        vec!["chat".into(), "chat_member".into()]
    }

    #[test]
    fn mariadb_and_mysql_lines_are_read() {
        let g = Grants::parse([
            "GRANT USAGE ON *.* TO `app`@`%` IDENTIFIED BY PASSWORD '*ABC'",
            "GRANT SELECT, INSERT, UPDATE ON `chatshard`.* TO `app`@`%`",
            "GRANT DELETE ON `chatshard`.`chat` TO `app`@`%`",
            "GRANT SELECT (`chat_id`), INSERT ON `other`.`t` TO `app`@`%`",
            "GRANT `reporting` TO `app`@`%`",
            "GRANT APPLICATION_PASSWORD_ADMIN,BACKUP_ADMIN ON *.* TO `root`@`localhost` WITH GRANT OPTION",
        ]);
        assert_eq!(g.roles, vec!["reporting".to_owned()]);
        assert!(g.missing_on("SELECT", "chatshard", &tables()).is_empty());
        assert_eq!(
            g.missing_on("DELETE", "chatshard", &tables()),
            vec!["`chatshard`.`chat_member`".to_owned()]
        );
        assert_eq!(
            g.grants[3].privileges,
            vec!["INSERT".to_owned()],
            "a column privilege is not a table one"
        );
        assert_eq!(
            g.missing_on("CREATE", "chatshard", &[]),
            vec!["`chatshard`.*".to_owned()]
        );
    }

    #[test]
    fn all_privileges_global_and_patterns_count() {
        let root =
            Grants::parse(["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION"]);
        assert!(root.missing_on("DELETE", "chatshard", &tables()).is_empty());
        let pattern = Grants::parse(["GRANT ALL ON `chat\\_%`.* TO 'app'@'10.%'"]);
        assert!(pattern.missing_on("DELETE", "chat_shard0", &[]).is_empty());
        assert!(!pattern.missing_on("DELETE", "chatXshard0", &[]).is_empty());
    }

    #[test]
    fn like_follows_sql() {
        assert!(like("chat%", "chatshard"));
        assert!(like("chat_", "chats"));
        assert!(!like("chat\\_", "chats"));
        assert!(like("chat\\_", "chat_"));
        assert!(like("%", ""));
        assert!(!like("a", "ab"));
    }
}
