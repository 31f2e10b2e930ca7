//! Proto enums as command-line values. A flag accepts each variant by its serde name, in the
//! kebab case clap spells values in (`round-robin` for the API's `round_robin`), so the proto
//! enum alone decides both what the flag takes and what the CLI sends to the admin API. The
//! serde name itself (`round_robin`, as README and config files spell it) is accepted too.

use clap::ValueEnum;
use clap::builder::PossibleValue;
use serde::Serialize;
use shoal_proto::proxy::Version;
use shoal_proto::{Algorithm, CheckKind, Protocol};

/// A proto enum value given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice<T>(pub T);

/// A proto enum the command line offers.
pub trait Choices: Copy + Serialize + 'static {
    /// Every variant, in the order help lists them (a new variant must be added here).
    const ALL: &'static [Choice<Self>];
}

impl<T: Choices> ValueEnum for Choice<T> {
    fn value_variants<'a>() -> &'a [Self] {
        T::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let (cli, serde) = (cli_name(self.0), serde_name(self.0));
        let value = PossibleValue::new(cli.clone());
        // A hidden alias: help lists one spelling, and a value copied from a config file works.
        Some(if serde == cli { value } else { value.alias(serde) })
    }
}

/// What the API, config files and `shoal pool list` call a unit variant.
pub fn serde_name<T: Serialize>(value: T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// What the command line calls a unit variant.
pub fn cli_name<T: Serialize>(value: T) -> String {
    serde_name(value).replace('_', "-")
}

impl Choices for Algorithm {
    const ALL: &'static [Choice<Self>] = &[
        Choice(Algorithm::RoundRobin),
        Choice(Algorithm::LeastConn),
        Choice(Algorithm::P2c),
        Choice(Algorithm::Maglev),
    ];
}

impl Choices for Protocol {
    const ALL: &'static [Choice<Self>] = &[Choice(Protocol::Http), Choice(Protocol::Tcp)];
}

impl Choices for CheckKind {
    const ALL: &'static [Choice<Self>] =
        &[Choice(CheckKind::Http), Choice(CheckKind::Tcp), Choice(CheckKind::Heartbeat), Choice(CheckKind::None)];
}

impl Choices for Version {
    const ALL: &'static [Choice<Self>] = &[Choice(Version::V1), Choice(Version::V2)];
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;

    use super::*;

    /// Each variant's CLI value is its serde name (kebab-cased), parses back to the variant,
    /// and the list is the one the CLI has always taken.
    fn check<T: Choices + DeserializeOwned + PartialEq + std::fmt::Debug>(accepted: &[&str]) {
        let names: Vec<String> = T::ALL.iter().map(|c| cli_name(c.0)).collect();
        assert_eq!(names, accepted);
        for c in T::ALL {
            let serde = serde_name(c.0);
            assert_eq!(cli_name(c.0), serde.replace('_', "-"));
            assert_eq!(serde_json::from_value::<T>(serde.clone().into()).ok(), Some(c.0), "{serde}");
            assert_eq!(Choice::<T>::from_str(&cli_name(c.0), false), Ok(*c));
            assert_eq!(Choice::<T>::from_str(&serde, false), Ok(*c), "the config's spelling {serde}");
        }
    }

    #[test]
    fn cli_values_are_the_serde_names() {
        check::<Algorithm>(&["round-robin", "least-conn", "p2c", "maglev"]);
        check::<Protocol>(&["http", "tcp"]);
        check::<CheckKind>(&["http", "tcp", "heartbeat", "none"]);
        check::<Version>(&["v1", "v2"]);
        assert_eq!(serde_name(Algorithm::RoundRobin), "round_robin", "the API's spelling");
    }

    #[test]
    fn every_variant_is_offered() {
        // Exhaustive matches: a new variant breaks the build here until `ALL` lists it.
        let algorithms = |a| match a {
            Algorithm::RoundRobin | Algorithm::LeastConn | Algorithm::P2c | Algorithm::Maglev => 4,
        };
        let checks = |c| match c {
            CheckKind::Http | CheckKind::Tcp | CheckKind::Heartbeat | CheckKind::None => 4,
        };
        let protocols = |p| match p {
            Protocol::Http | Protocol::Tcp => 2,
        };
        let versions = |v| match v {
            Version::V1 | Version::V2 => 2,
        };
        assert_eq!(Algorithm::ALL.len(), algorithms(Algorithm::P2c));
        assert_eq!(CheckKind::ALL.len(), checks(CheckKind::Tcp));
        assert_eq!(Protocol::ALL.len(), protocols(Protocol::Tcp));
        assert_eq!(Version::ALL.len(), versions(Version::V1));
    }
}
