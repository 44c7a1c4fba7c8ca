//! The command queue's rules: which state changes are allowed, and which open commands go
//! out on a channel now.

use crate::model::{CommandRecord, CommandState, Millis};

/// The channel a VM asks for its commands on.
#[derive(Debug, Clone, Copy)]
pub enum Channel<'a> {
    /// `GET .../commands`. `acks` says whether this agent acknowledges commands; one that
    /// never does (a base-contract agent) gets each command once.
    Http { acks: bool },
    /// A gRPC stream, named by its id.
    Stream { stream_id: &'a str },
}

/// The value stored in `delivered_via` for a stream.
pub fn stream_via(stream_id: &str) -> String {
    format!("grpc:{stream_id}")
}

/// Which open commands (in queue order) go out now on `channel`.
///
/// * Expired ones never do.
/// * Pending ones always do.
/// * Delivered, unacknowledged ones go out again on a stream other than the one that carried
///   them (a reconnect), or once `redeliver_after` has passed since the last delivery; over
///   HTTP only to agents that acknowledge.
pub fn select_deliverable<'c>(
    open: &'c [CommandRecord],
    channel: Channel<'_>,
    now: Millis,
    redeliver_after: Millis,
) -> Vec<&'c CommandRecord> {
    open.iter()
        .filter(|c| c.expires_at.is_none_or(|e| e > now))
        .filter(|c| match c.state {
            CommandState::Pending => true,
            CommandState::Delivered => {
                let timed_out = c.delivered_at.is_none_or(|d| d + redeliver_after <= now);
                match channel {
                    Channel::Http { acks } => acks && timed_out,
                    Channel::Stream { stream_id } => {
                        c.delivered_via.as_deref() != Some(stream_via(stream_id).as_str())
                            || timed_out
                    }
                }
            }
            _ => false,
        })
        .collect()
}

/// Whether a command may move from `from` to `to`; the store applies no other transition.
///
/// | from | to |
/// |---|---|
/// | pending | delivered (sent) |
/// | delivered | delivered (sent again: reconnect or redelivery timeout) |
/// | pending, delivered | expired (past `expires_at`, or a registration superseded by a new boot) |
/// | pending, delivered, expired | acknowledged, failed (a late answer is still recorded) |
///
/// Acknowledged and failed are final.
pub fn may_transition(from: CommandState, to: CommandState) -> bool {
    use CommandState::{Acknowledged, Delivered, Expired, Failed, Pending};
    matches!(
        (from, to),
        (Pending | Delivered, Delivered)
            | (Pending | Delivered, Expired)
            | (Pending | Delivered | Expired, Acknowledged | Failed)
    )
}

/// The states a command may be in to move to `to`, per [`may_transition`].
pub fn from_states(to: CommandState) -> Vec<CommandState> {
    CommandState::ALL
        .into_iter()
        .filter(|from| may_transition(*from, to))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandState::{Acknowledged, Delivered, Expired, Failed, Pending};

    #[test]
    fn the_transition_table() {
        let allowed: Vec<(CommandState, CommandState)> = CommandState::ALL
            .into_iter()
            .flat_map(|f| CommandState::ALL.into_iter().map(move |t| (f, t)))
            .filter(|(f, t)| may_transition(*f, *t))
            .collect();
        assert_eq!(
            allowed,
            [
                (Pending, Delivered),
                (Pending, Acknowledged),
                (Pending, Failed),
                (Pending, Expired),
                (Delivered, Delivered),
                (Delivered, Acknowledged),
                (Delivered, Failed),
                (Delivered, Expired),
                (Expired, Acknowledged),
                (Expired, Failed),
            ]
        );
        // Final states never move; nothing goes back to pending.
        for to in CommandState::ALL {
            assert!(!may_transition(Acknowledged, to) && !may_transition(Failed, to));
            assert!(!may_transition(to, Pending));
        }
        assert_eq!(from_states(Acknowledged), [Pending, Delivered, Expired]);
    }
}
