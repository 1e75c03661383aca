//! Lua scripts run on the link: `EVALSHA`, then `EVAL` when Redis does not know the script.

use fred::error::Error as RedisError;
use fred::interfaces::ClientLike;
use fred::types::{ClusterHash, CustomCommand, FromValue, Value};
use sha1::{Digest, Sha1};

use super::RedisLink;

/// A Lua script with one key, known by its SHA-1.
pub struct Script {
    source: &'static str,
    sha1: String,
}

impl Script {
    pub fn new(source: &'static str) -> Script {
        let sha1 = format!("{:x}", Sha1::digest(source.as_bytes()));
        Script { source, sha1 }
    }

    /// Runs the script on `key` with `args` through `link`'s command client, bounded by the link's
    /// timeout (which the error says when it is the cause). `EVALSHA` first; on `NOSCRIPT` (a
    /// fresh or restarted Redis) `EVAL`, which also caches the script for the next call. An
    /// outage is reported to the link.
    pub async fn run<R: FromValue>(
        &self,
        link: &RedisLink,
        key: &str,
        args: Vec<Value>,
    ) -> Result<R, RedisError> {
        let call = async {
            match self.call(link, "EVALSHA", &self.sha1, key, &args).await {
                Err(e) if e.details().starts_with("NOSCRIPT") => {
                    self.call(link, "EVAL", self.source, key, &args).await
                }
                other => other,
            }
        };
        link.bounded(call).await
    }

    /// `command script 1 key args...`. Through `custom` because fred's `eval` takes no
    /// per-command options; the key (argument 2) picks the cluster node.
    async fn call<R: FromValue>(
        &self,
        link: &RedisLink,
        command: &'static str,
        script: &str,
        key: &str,
        args: &[Value],
    ) -> Result<R, RedisError> {
        let command = CustomCommand::new_static(command, ClusterHash::Offset(2), false);
        let mut all = Vec::with_capacity(args.len() + 3);
        all.push(Value::from(script));
        all.push(Value::from(1_i64));
        all.push(Value::from(key));
        all.extend(args.iter().cloned());
        link.commands()
            .with_options(link.options())
            .custom(command, all)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_is_what_redis_computes() {
        // `redis-cli SCRIPT LOAD "return 1"`
        assert_eq!(
            Script::new("return 1").sha1,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}
