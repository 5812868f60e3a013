//! Owner and group names as `ls` inside the runner shows them.
//!
//! The names come from the runner's own `/etc/passwd` and `/etc/group` (not the host's), and
//! host ids are first translated into the runner's user namespace.

use std::collections::HashMap;
use std::io::Read;

use super::IdMap;
use super::resolve::Tree;

/// The size of the id range the runner's user namespace maps.
const MAPPED_IDS: u32 = 65_536;
/// The id the kernel reports inside a user namespace for an unmapped host id.
const OVERFLOW_ID: u32 = 65_534;
/// Bounds the read of a planted giant `/etc/passwd`.
const MAX_TABLE_BYTES: u64 = 1 << 20;

/// Id → name tables of the runner.
#[derive(Debug)]
pub(super) struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    ids: IdMap,
}

impl Names {
    /// Reads the runner's tables with the calling thread's credentials; an unreadable table
    /// leaves the ids numeric, as `ls` does.
    pub(super) fn read(tree: &Tree<'_>, ids: IdMap) -> Names {
        Names {
            users: parse_id_table(&read_table(tree, "/etc/passwd")),
            groups: parse_id_table(&read_table(tree, "/etc/group")),
            ids,
        }
    }

    pub(super) fn owner(&self, host_uid: u32) -> String {
        name_of(&self.users, sandbox_id(host_uid, self.ids.root_uid))
    }

    pub(super) fn group(&self, host_gid: u32) -> String {
        name_of(&self.groups, sandbox_id(host_gid, self.ids.root_gid))
    }
}

fn read_table(tree: &Tree<'_>, path: &str) -> String {
    let Ok((file, _)) = tree.open_regular(path) else {
        return String::new();
    };
    let mut content = Vec::new();
    if file.take(MAX_TABLE_BYTES).read_to_end(&mut content).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&content).into_owned()
}

/// Parses `passwd`/`group` lines (`name:password:id:...`); the first line for an id wins, as
/// with `getpwuid`. Malformed lines are skipped.
pub(super) fn parse_id_table(text: &str) -> HashMap<u32, String> {
    let mut table = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_password), Some(id)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(id) = id.parse::<u32>() else {
            continue;
        };
        if !name.is_empty() {
            table.entry(id).or_insert_with(|| name.to_owned());
        }
    }
    table
}

/// The id the runner sees for a host id, given the host id its root maps to.
pub(super) fn sandbox_id(host_id: u32, base: u32) -> u32 {
    host_id.checked_sub(base).filter(|id| *id < MAPPED_IDS).unwrap_or(OVERFLOW_ID)
}

fn name_of(table: &HashMap<u32, String>, id: u32) -> String {
    table.get(&id).cloned().unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment line\n\
        broken line\n\
        user:x:1001:1001::/home/user:/bin/bash\n\
        duplicate:x:1001:1001::/:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        :x:7:7::/:/bin/sh\n\
        bad:x:notanumber:1::/:/bin/sh";

    #[test]
    fn passwd_parsing_keeps_first_name_per_id_and_skips_malformed_lines() {
        let table = parse_id_table(PASSWD);
        assert_eq!(table.get(&0).map(String::as_str), Some("root"));
        assert_eq!(table.get(&1001).map(String::as_str), Some("user"));
        assert_eq!(table.get(&65534).map(String::as_str), Some("nobody"));
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn group_parsing_reads_the_third_field() {
        let table = parse_id_table("root:x:0:\nuser:x:1001:user,other\n");
        assert_eq!(table.get(&1001).map(String::as_str), Some("user"));
        assert_eq!(table.get(&0).map(String::as_str), Some("root"));
    }

    #[test]
    fn host_ids_are_translated_into_the_user_namespace() {
        assert_eq!(sandbox_id(100_000, 100_000), 0);
        assert_eq!(sandbox_id(101_001, 100_000), 1001);
        assert_eq!(sandbox_id(0, 100_000), OVERFLOW_ID);
        assert_eq!(sandbox_id(100_000 + 65_536, 100_000), OVERFLOW_ID);
    }

    #[test]
    fn owner_names_come_from_the_runner_tables_or_stay_numeric() {
        let names = Names {
            users: parse_id_table(PASSWD),
            groups: parse_id_table("root:x:0:\n"),
            ids: IdMap {
                root_uid: 100_000,
                root_gid: 100_000,
                user_uid: 101_001,
                user_gid: 101_001,
            },
        };
        assert_eq!(names.owner(100_000), "root");
        assert_eq!(names.owner(101_001), "user");
        assert_eq!(names.owner(100_042), "42");
        assert_eq!(names.owner(0), "nobody");
        assert_eq!(names.group(101_001), "1001");
        assert_eq!(names.group(0), "65534");
    }
}
