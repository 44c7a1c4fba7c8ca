//! The admin API over HTTP(S): authentication, TLS, and errors worded for operators.

use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error(
        "the controller refused the token ({message}); check --token-file / MIGCTL_TOKEN_FILE / --token / MIGCTL_TOKEN / token_file"
    )]
    Unauthorized { message: String },
    #[error("not allowed: {message}")]
    Forbidden { message: String },
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("unreadable answer from the controller: {0}")]
    Decode(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error(
        "no operator token: pass --token-file FILE (or set MIGCTL_TOKEN_FILE), or --token / MIGCTL_TOKEN, or put token_file in ~/.config/migctl/config.toml; a fresh controller writes one to <data-dir>/initial-admin-token, and `mig-controller token create` makes more"
    )]
    NoToken,
}

/// Where and as whom to connect.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub endpoint: String,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    stream: reqwest::Client,
    endpoint: String,
    token: String,
}

use miglet_proto::error_chain;

fn builder(t: &Target) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &t.ca_file {
        let pem =
            std::fs::read(ca).map_err(|e| ClientError::Tls(format!("{}: {e}", ca.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| ClientError::Tls(format!("{}: {e}", ca.display())))?;
        b = b.tls_certs_only(certs);
    }
    if let Some((cert, key)) = &t.client_cert {
        let mut pem = std::fs::read(cert)
            .map_err(|e| ClientError::Tls(format!("{}: {e}", cert.display())))?;
        pem.push(b'\n');
        pem.extend(
            std::fs::read(key).map_err(|e| ClientError::Tls(format!("{}: {e}", key.display())))?,
        );
        b = b.identity(
            reqwest::Identity::from_pem(&pem).map_err(|e| ClientError::Tls(e.to_string()))?,
        );
    }
    Ok(b)
}

impl Client {
    pub fn new(t: &Target) -> Result<Client, ClientError> {
        let token = t
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or(ClientError::NoToken)?;
        let http = builder(t)?
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Tls(error_chain(&e)))?;
        let stream = builder(t)?
            .build()
            .map_err(|e| ClientError::Tls(error_chain(&e)))?;
        Ok(Client {
            http,
            stream,
            endpoint: t.endpoint.trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason: error_chain(e),
        }
    }

    async fn answer(r: reqwest::Response) -> Result<Value, ClientError> {
        let status = r.status();
        let text = r
            .text()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = body["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| text.chars().take(200).collect());
        match status {
            s if s.is_success() => {
                if body.is_null() && !text.trim().is_empty() {
                    return Err(ClientError::Decode(text.chars().take(200).collect()));
                }
                Ok(body)
            }
            StatusCode::UNAUTHORIZED => Err(ClientError::Unauthorized { message }),
            StatusCode::FORBIDDEN => Err(ClientError::Forbidden { message }),
            s => Err(ClientError::Api {
                status: s.as_u16(),
                message: format!("{} ({})", message, s.as_u16()),
            }),
        }
    }

    /// `GET path` with `query` pairs (empty values are left out).
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        let query: Vec<&(&str, String)> = query.iter().filter(|(_, v)| !v.is_empty()).collect();
        let r = self
            .http
            .request(Method::GET, self.url(path))
            .bearer_auth(&self.token)
            .query(&query)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        Self::answer(r).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        Self::answer(r).await
    }

    /// Opens the live event stream; `on_open` runs once it is open (later events reach
    /// it), then `on_event` gets each event's JSON until it returns false or the stream ends.
    pub async fn watch(
        &self,
        query: &[(&str, String)],
        on_open: impl FnOnce(),
        mut on_event: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let query: Vec<&(&str, String)> = query.iter().filter(|(_, v)| !v.is_empty()).collect();
        let mut r = self
            .stream
            .get(self.url("/api/v1/admin/events/stream"))
            .bearer_auth(&self.token)
            .query(&query)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !r.status().is_success() {
            return Self::answer(r).await.map(|_| ());
        }
        on_open();
        let mut buf = String::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| self.unreachable(&e))? {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let data: String = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue;
                }
                let v: Value =
                    serde_json::from_str(&data).map_err(|e| ClientError::Decode(e.to_string()))?;
                if !on_event(v) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
