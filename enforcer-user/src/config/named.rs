//! Enums of a few named values (the mode, the presets): each name is
//! written once, and the command line, the configuration file, logs and pin
//! directory names all use it.

/// An enum of a few named values, each name written once: `as_str`,
/// `Display` and `FromStr` use it, and so do the derived clap (flags and
/// environment) and serde (configuration file) impls, so a name cannot
/// differ between them.
macro_rules! named_values {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident = $text:literal,)+ }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
        pub enum $name {
            $($(#[$variant_meta])* #[value(name = $text)] #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in the order the names are listed.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// Every name, in the same order.
            pub const NAMES: &'static [&'static str] = &[$($text,)+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::config::named::UnknownName;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|value| value.as_str() == text)
                    .ok_or_else(|| $crate::config::named::UnknownName {
                        given: text.to_owned(),
                        expected: Self::NAMES,
                    })
            }
        }
    };
}

pub(crate) use named_values;

/// A name that is none of a [`named_values!`] enum's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{given:?} is not one of {}", expected.join(", "))]
pub struct UnknownName {
    pub given: String,
    pub expected: &'static [&'static str],
}

named_values! {
    /// Whether blocked attempts are refused or only counted.
    pub enum Mode {
        Enforce = "enforce",
        Audit = "audit",
    }
}

named_values! {
    /// A feature turned on or off (the node edge guard, the BPF LSM).
    pub enum Switch {
        On = "on",
        Off = "off",
    }
}
