//! The settings as command-line flags: `--drain-delay 2s` for `SEQCAST_DRAIN_DELAY`,
//! `--database-url` for `DATABASE_URL`. A flag given wins over its variable; what is given either
//! way goes through [`Config::from_lookup`], so flags and variables share one parser, one set of
//! checks and one set of defaults.

use std::collections::HashMap;

use clap::{Arg, ArgMatches};

use super::settings::SETTINGS;
use super::Config;

/// The flag of a variable: its name without `SEQCAST_`, in kebab case.
pub fn flag_name(variable: &str) -> String {
    variable
        .strip_prefix("SEQCAST_")
        .unwrap_or(variable)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// One flag per setting, global (accepted before or after any subcommand), each reading its
/// variable too; `--help` lists them with their defaults. Variable values are not shown in the
/// help: some are secrets.
pub fn args() -> Vec<Arg> {
    let defaults = Config::default();
    SETTINGS
        .iter()
        .map(|s| {
            let default = match s.default {
                Some(text) => text.to_owned(),
                None => defaults.shown(s.name).unwrap_or_default(),
            };
            let default = if default.is_empty() {
                "unset".to_owned()
            } else {
                default
            };
            Arg::new(s.name)
                .long(flag_name(s.name))
                .env(s.name)
                .hide_env_values(true)
                .value_name("VALUE")
                .help(format!("{} [default: {default}]", s.help))
                .help_heading("Settings (flag, or environment variable)")
                .global(true)
        })
        .collect()
}

/// The settings given on the command line or in the environment, by variable name, read from
/// the matches of the subcommand that runs (global flags are copied down to it).
pub fn given(matches: &ArgMatches) -> HashMap<&'static str, String> {
    let mut leaf = matches;
    while let Some((_, sub)) = leaf.subcommand() {
        leaf = sub;
    }
    SETTINGS
        .iter()
        .filter_map(|s| {
            let value = leaf.try_get_one::<String>(s.name).ok().flatten()?;
            Some((s.name, value.clone()))
        })
        .collect()
}

/// The configuration from what was given (see [`given`]), checked as [`Config::from_lookup`]
/// checks it.
pub fn config(given: &HashMap<&'static str, String>) -> anyhow::Result<Config> {
    Config::from_lookup(|name| given.get(name).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> HashMap<&'static str, String> {
        let command = clap::Command::new("seqcast")
            .args(args())
            .subcommand(clap::Command::new("serve"));
        given(&command.try_get_matches_from(argv).unwrap())
    }

    #[test]
    fn flags_are_the_variables_in_kebab_case() {
        assert_eq!(flag_name("SEQCAST_DRAIN_DELAY"), "drain-delay");
        assert_eq!(flag_name("DATABASE_URL"), "database-url");
        let given = parse(&[
            "seqcast",
            "--drain-delay",
            "3s",
            "serve",
            "--listen",
            "[::1]:0",
        ]);
        assert_eq!(given["SEQCAST_DRAIN_DELAY"], "3s");
        assert_eq!(given["SEQCAST_LISTEN"], "[::1]:0");
        let c = config(&given).unwrap();
        assert_eq!(c.drain_delay, std::time::Duration::from_secs(3));
        assert!(config(&parse(&["seqcast", "--drain-delay", "soon"])).is_err());
    }
}
