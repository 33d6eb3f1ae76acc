//! The end of a login (or of a COM_CHANGE_USER): a client that names a database gets it
//! checked on a connection first, as MariaDB refuses a login to a database that does not
//! exist; then its OK.

use super::{release, Cx, Flow, Got, Readiness, Ready, Step};
use crate::mysql::wire::ok_packet;
use crate::session::borrowing::Borrowing;
use crate::session::state::Needs;

/// A client just logged in, to be told so at sequence id `seq`.
#[derive(Debug)]
pub struct Connect {
    seq: u8,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Start,
    Readying(Ready),
    /// The database was refused: the client is told, then the session ends.
    Refused,
    Releasing,
    Told,
}

impl Connect {
    pub fn new(seq: u8) -> Connect {
        Connect {
            seq,
            stage: Stage::Start,
        }
    }

    fn ok(&mut self, cx: &mut Cx<'_>) -> Step<'static> {
        self.stage = Stage::Told;
        Step::Tell {
            seq: self.seq,
            payload: ok_packet(cx.s.status),
        }
    }

    fn ready(&mut self, cx: &mut Cx<'_>, r: Readiness) -> Step<'static> {
        match r {
            Readiness::Step(step) => step,
            Readiness::Ready(_) => {
                self.stage = Stage::Releasing;
                match release(cx, Got::Start) {
                    Step::Done => self.ok(cx),
                    step => step,
                }
            }
            Readiness::Failed(e) => {
                self.stage = Stage::Refused;
                Step::Tell {
                    seq: self.seq,
                    payload: e.encode(),
                }
            }
        }
    }
}

impl Flow for Connect {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        match &mut self.stage {
            Stage::Start if cx.s.state.schema.is_none() => self.ok(cx),
            Stage::Start => {
                let mut ready = Ready::new(Borrowing::new(Needs::default(), true, false));
                let r = ready.step(cx, Got::Start);
                self.stage = Stage::Readying(ready);
                self.ready(cx, r)
            }
            Stage::Readying(ready) => {
                let r = ready.step(cx, got);
                self.ready(cx, r)
            }
            Stage::Refused => Step::EndSession,
            Stage::Releasing => match release(cx, got) {
                Step::Done => self.ok(cx),
                step => step,
            },
            Stage::Told => Step::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::status;
    use crate::mysql::wire::ErrPacket;
    use crate::serving::testing::Script;
    use crate::session::borrowing::Replayed;

    #[test]
    fn a_login_without_a_database_is_told_ok_at_once() {
        let mut t = Script::new(crate::session::testing::session(None), None);
        let steps = t.run(&mut Connect::new(2), vec![Got::Told]);
        assert_eq!(
            steps,
            [
                Step::Tell {
                    seq: 2,
                    payload: ok_packet(status::AUTOCOMMIT)
                },
                Step::Done
            ]
        );
    }

    #[test]
    fn a_database_is_checked_on_a_connection_first() {
        let mut t = Script::new(crate::session::testing::session(Some(b"shop")), None);
        let answers = vec![Got::Lent, Got::Replayed(Replayed::Done), Got::Told];
        let steps = t.run(&mut Connect::new(2), answers);
        let [Step::Borrow, Step::Replay { .. }, Step::CheckIn, Step::Tell { seq: 2, .. }, Step::Done] =
            steps
        else {
            panic!("{steps:?}");
        };
        assert!(t.held.is_none(), "given back");
    }

    #[test]
    fn a_database_that_does_not_exist_ends_the_session() {
        let mut t = Script::new(crate::session::testing::session(Some(b"nope")), None);
        let unknown = ErrPacket::new(1049, "42000", "Unknown database 'nope'");
        let answers = vec![
            Got::Lent,
            Got::Replayed(Replayed::Refused(unknown.clone())),
            Got::Told,
        ];
        let steps = t.run(&mut Connect::new(2), answers);
        assert_eq!(
            steps[2..],
            [
                Step::Tell {
                    seq: 2,
                    payload: unknown.encode()
                },
                Step::EndSession
            ]
        );
    }
}
