//! How both programs resolve a setting: the command-line flag, else its environment variable
//! (clap's `env`, one `Option` for both), else the config file, else a value discovered at
//! run time (the agent's metadata server), else the default. Written once here so that the
//! agent and the controller cannot drift apart on precedence or on what "set" means.
//!
//! An empty string is "not set" (so `MIGLET_POOL_ID=` in a unit file falls through to the
//! next layer, like an absent variable); any other value is set.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A value a settings layer may hold.
pub trait Setting: Clone {
    /// Whether this layer decides the setting (an empty string or path does not).
    fn is_set(&self) -> bool {
        true
    }
}

impl Setting for String {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl Setting for PathBuf {
    fn is_set(&self) -> bool {
        !self.as_os_str().is_empty()
    }
}

macro_rules! always_set {
    ($($t:ty),*) => { $(impl Setting for $t {})* };
}
always_set!(bool, u16, u32, u64, usize, i64, f64, SocketAddr);

/// The first layer, in precedence order, that sets the value.
///
/// ```
/// use miglet_proto::settings::layered;
/// let flag: Option<String> = Some(String::new()); // MIGLET_POOL_ID= (empty)
/// let file = Some("pool-a".to_owned());
/// assert_eq!(layered([flag.as_ref(), file.as_ref()]), Some("pool-a".to_owned()));
/// ```
pub fn layered<'a, T: Setting + 'a>(layers: impl IntoIterator<Item = Option<&'a T>>) -> Option<T> {
    layers.into_iter().flatten().find(|v| v.is_set()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_layer_that_sets_a_value_wins() {
        let flag = Some(7u64);
        let file = Some(9u64);
        assert_eq!(layered([flag.as_ref(), file.as_ref()]), Some(7));
        assert_eq!(layered([None, file.as_ref()]), Some(9));
        assert_eq!(layered::<u64>([None, None]), None);
    }

    #[test]
    fn empty_text_and_paths_fall_through() {
        let empty = Some(String::new());
        let set = Some("x".to_owned());
        assert_eq!(layered([empty.as_ref(), set.as_ref()]), set);
        assert_eq!(layered([empty.as_ref()]), None);
        let no_path = Some(PathBuf::new());
        let path = Some(PathBuf::from("/var/lib/miglet"));
        assert_eq!(layered([no_path.as_ref(), path.as_ref()]), path);
        // Zero and false are values, not "unset".
        let zero = Some(0u32);
        assert_eq!(layered([zero.as_ref(), Some(&5)]), Some(0));
    }
}
