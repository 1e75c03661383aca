//! A scripted fake server (not seqcast), for what a healthy seqcast does not do on demand.

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub type Log = Arc<Mutex<Vec<(usize, Value)>>>;

/// Serves WebSockets on a free port; every client frame is logged with its connection's number
/// (from 0) and answered with what `script(conn, frame)` returns. Returns the URL and the log.
pub async fn fake<F>(script: F) -> (String, Log)
where
    F: Fn(usize, &Value) -> Vec<Value> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let script = Arc::new(script);
    let server_log = Arc::clone(&log);
    tokio::spawn(async move {
        for conn in 0.. {
            let (tcp, _) = listener.accept().await.unwrap();
            let (script, log) = (Arc::clone(&script), Arc::clone(&server_log));
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let WsMessage::Text(text) = msg else { continue };
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                    log.lock().unwrap().push((conn, frame.clone()));
                    for reply in script(conn, &frame) {
                        if ws.send(WsMessage::text(reply.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, log)
}

pub fn frames_of(log: &Log, ty: &str) -> Vec<(usize, Value)> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(_, f)| f["type"] == ty)
        .cloned()
        .collect()
}
