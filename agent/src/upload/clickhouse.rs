//! Uploading straight into ClickHouse's HTTP interface: the INSERT is built per body, and
//! the body's idempotency key becomes `insert_deduplication_token`, so a body retried
//! after a lost reply is stored once (in the table and in the views fed from it).
use reqwest::Url;

/// A single-quoted SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The INSERT for one body.
pub fn insert_query(table: &str, key: &str) -> String {
    format!(
        "INSERT INTO {table} SETTINGS insert_deduplication_token = {}, deduplicate_blocks_in_dependent_materialized_views = 1 FORMAT JSONEachRow",
        literal(key)
    )
}

/// `base` with its `query` parameter set to the INSERT for one body (other parameters,
/// such as `database` or ClickHouse settings, are kept).
pub fn insert_url(base: &Url, table: &str, key: &str) -> Url {
    let mut u = base.clone();
    let kept: Vec<(String, String)> = base
        .query_pairs()
        .filter(|(k, _)| k != "query")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    {
        let mut q = u.query_pairs_mut();
        q.clear();
        for (k, v) in &kept {
            q.append_pair(k, v);
        }
        q.append_pair("query", &insert_query(table, key));
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_carries_the_token_and_keeps_other_parameters() {
        let base: Url = "https://ch.example:8443/?database=x&async_insert=0"
            .parse()
            .unwrap();
        let u = insert_url(&base, "sockacct.records", "host-a:b00t:41-43");
        let q: Vec<(String, String)> = u.query_pairs().map(|(k, v)| (k.into(), v.into())).collect();
        assert_eq!(q[0], ("database".into(), "x".into()));
        assert_eq!(q[1], ("async_insert".into(), "0".into()));
        assert_eq!(q[2].0, "query");
        assert!(q[2].1.starts_with(
            "INSERT INTO sockacct.records SETTINGS insert_deduplication_token = 'host-a:b00t:41-43'"
        ));
        assert!(q[2].1.ends_with("FORMAT JSONEachRow"));
        assert_eq!(insert_query("t", "a'b"), insert_query("t", "a'b"));
        assert!(insert_query("t", "a'b\\").contains(r"'a\'b\\'"));
    }
}
