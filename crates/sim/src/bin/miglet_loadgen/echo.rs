//! The baselines a run is compared with: a bare tonic bidirectional echo server speaking the
//! controller's service (what the transport alone costs), and loopback TCP round-trip time.

use miglet_proto::pb::command_service_server::{CommandService, CommandServiceServer};
use miglet_proto::pb::{
    self, ControllerMessage, MiGletMessage, controller_message, mi_glet_message,
};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Answers each message the way the controller shapes its answers, with nothing behind it:
/// `connect` -> `connect_ack`, an `event` -> `event_ack`, a `command_ack` -> a `command` with
/// the same id (the latency probe), a heartbeat -> nothing.
#[derive(Debug, Default)]
struct Echo;

fn reply(m: MiGletMessage) -> Option<ControllerMessage> {
    let out = match m.message? {
        mi_glet_message::Message::Connect(_) => {
            controller_message::Message::ConnectAck(pb::ConnectAck {
                accepted: true,
                message: "echo".into(),
                server_version: "echo".into(),
            })
        }
        mi_glet_message::Message::Event(ev) => {
            controller_message::Message::EventAck(pb::EventAck {
                event_ids: ev.data.get("event_id").cloned().into_iter().collect(),
            })
        }
        mi_glet_message::Message::CommandAck(a) => {
            controller_message::Message::Command(pb::Command {
                id: a.command_id,
                r#type: "set_log_level".into(),
                ..Default::default()
            })
        }
        mi_glet_message::Message::Heartbeat(_) | mi_glet_message::Message::Error(_) => {
            return None;
        }
    };
    Some(ControllerMessage { message: Some(out) })
}

#[tonic::async_trait]
impl CommandService for Echo {
    type StreamCommandsStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn stream_commands(
        &self,
        request: Request<Streaming<MiGletMessage>>,
    ) -> Result<Response<Self::StreamCommandsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(r) = reply(m)
                    && tx.send(Ok(r)).await.is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the echo service on a loopback port until killed; writes `{"grpc_addr": ...}` to
/// `addr_file` once listening. Same runtime shape as the controller (multi-threaded tokio).
pub async fn serve(addr_file: &Path) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tmp = addr_file.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::json!({ "grpc_addr": addr.to_string() }).to_string(),
    )?;
    std::fs::rename(&tmp, addr_file)?;
    tonic::transport::Server::builder()
        .add_service(CommandServiceServer::new(Echo))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

/// Round-trip times of 64-byte messages over one loopback TCP connection (TCP_NODELAY), in
/// milliseconds, sorted.
pub fn loopback_rtt(rounds: usize) -> std::io::Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(_) => return Ok(()),
            }
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [7u8; 64];
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(c);
    let _ = server.join();
    out.sort_by(f64::total_cmp);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_answers_like_the_controller_shapes_its_answers() {
        let probe = MiGletMessage {
            message: Some(mi_glet_message::Message::CommandAck(pb::CommandAck {
                command_id: "probe-1".into(),
                ..Default::default()
            })),
        };
        match reply(probe).and_then(|r| r.message) {
            Some(controller_message::Message::Command(c)) => assert_eq!(c.id, "probe-1"),
            other => panic!("{other:?}"),
        }
        let hb = MiGletMessage {
            message: Some(mi_glet_message::Message::Heartbeat(pb::Heartbeat::default())),
        };
        assert!(reply(hb).is_none());
    }

    #[test]
    fn loopback_rtt_measures_every_round() -> std::io::Result<()> {
        let rtt = loopback_rtt(50)?;
        assert_eq!(rtt.len(), 50);
        assert!(rtt.windows(2).all(|w| w[0] <= w[1]));
        Ok(())
    }
}
