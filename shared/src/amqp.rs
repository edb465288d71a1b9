//! The RabbitMQ side: topology names and declaration, and the job message envelope.
//!
//! Every service declares the topology at start (declarations are idempotent), and
//! `rabbitmq/definitions.json` mirrors it for operators who load definitions up front.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use std::time::Duration;

use crate::Settings;
use crate::retry::tier_name;

/// A message that keeps killing its consumer is dead-lettered after this many deliveries
/// instead of looping forever.
pub const DELIVERY_LIMIT: i32 = 5;

/// Headers of the dead letters a worker publishes itself (a job out of attempts). The
/// broker's own dead letters carry `x-death` instead; the dead-letter sink tells the two
/// apart by [`headers::REASON`].
pub mod headers {
    /// Why the worker dead-lettered the job: `max_attempts`.
    pub const REASON: &str = "x-spool-reason";
    /// How many attempts the job had.
    pub const ATTEMPTS: &str = "x-spool-attempts";
    /// The last attempt's error code.
    pub const ERROR_CODE: &str = "x-spool-error-code";
    /// The last attempt's error message.
    pub const ERROR: &str = "x-spool-error";
}

/// Names of every exchange and queue, derived from one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    queue_expires_ms: Option<u32>,
    retry_tiers: Vec<Duration>,
}

impl Topology {
    pub fn new(settings: &Settings) -> Self {
        Self {
            prefix: settings.amqp.prefix.clone(),
            queue_expires_ms: settings.amqp.queue_expires_ms,
            retry_tiers: settings.amqp.retry_tiers(),
        }
    }

    pub fn retry_tiers(&self) -> &[Duration] {
        &self.retry_tiers
    }

    /// Fanout exchange of a retry tier: publish there with the model as routing key; the
    /// key survives the TTL and dead-lettering back to the jobs exchange.
    pub fn retry_exchange(&self, delay: Duration) -> String {
        format!("{}.retry.{}", self.prefix, tier_name(delay))
    }

    pub fn retry_queue(&self, delay: Duration) -> String {
        self.retry_exchange(delay)
    }

    /// Direct exchange every job is published to, with the model name as routing key.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// The quorum queue holding one model's jobs.
    pub fn job_queue(&self, model: &str) -> String {
        format!("{}.jobs.{model}", self.prefix)
    }

    /// Where messages go once they can no longer be delivered.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    fn quorum_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        if let Some(ms) = self.queue_expires_ms {
            arguments.insert("x-expires".into(), AMQPValue::LongInt(ms as i32));
        }
        arguments
    }

    fn job_queue_arguments(&self) -> FieldTable {
        let mut arguments = self.quorum_arguments();
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(DELIVERY_LIMIT));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_exchange().into()));
        // At-least-once dead-lettering: the broker keeps a message until the dead-letter
        // queue confirms it, so nothing is dropped on the way (it requires reject-publish).
        arguments.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        arguments
    }

    fn retry_queue_arguments(&self, delay: Duration) -> FieldTable {
        let mut arguments = self.quorum_arguments();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(delay.as_millis().min(i32::MAX as u128) as i32));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.jobs_exchange().into()));
        arguments.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        arguments
    }

    /// Declares exchanges and queues for the given models. Idempotent.
    pub async fn declare(&self, channel: &Channel, models: &[String]) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(self.jobs_exchange().into(), ExchangeKind::Direct, durable, FieldTable::default())
            .await?;
        channel
            .exchange_declare(self.dead_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await?;
        channel
            .queue_declare(self.dead_queue().into(), QueueDeclareOptions::durable(), self.quorum_arguments())
            .await?;
        channel
            .queue_bind(
                self.dead_queue().into(),
                self.dead_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for delay in &self.retry_tiers {
            let name = self.retry_exchange(*delay);
            channel
                .exchange_declare(name.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
                .await?;
            channel
                .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), self.retry_queue_arguments(*delay))
                .await?;
            channel
                .queue_bind(
                    name.as_str().into(),
                    name.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        for model in models {
            channel
                .queue_declare(self.job_queue(model).into(), QueueDeclareOptions::durable(), self.job_queue_arguments())
                .await?;
            channel
                .queue_bind(
                    self.job_queue(model).into(),
                    self.jobs_exchange().into(),
                    model.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// Opens a connection to the broker named in the settings.
pub async fn connect(settings: &Settings, name: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(settings.amqp_url.expose_secret(), properties).await
}

/// The body of a job message. Small and versioned: the input stays in PostgreSQL, which
/// the worker reads anyway when it claims the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEnvelope {
    /// Envelope format version.
    pub v: u8,
    pub job_id: Uuid,
    pub model: String,
    /// The `x-request-id` of the request that created the job: the worker logs it with the
    /// job's outcome, so one id finds the job in the API's and the worker's logs.
    pub trace_id: Option<String>,
    /// On a retry: the attempt that failed. If that attempt's result was never written
    /// (the job still reads `running` at that attempt), the retry may take the job over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<i32>,
}

impl JobEnvelope {
    pub const VERSION: u8 = 1;

    pub fn new(job_id: Uuid, model: &str, trace_id: Option<&str>) -> Self {
        Self {
            v: Self::VERSION,
            job_id,
            model: model.to_owned(),
            trace_id: trace_id.map(str::to_owned),
            retry_of: None,
        }
    }

    /// The message of a retry that follows attempt `attempt`.
    pub fn retrying(mut self, attempt: i32) -> Self {
        self.retry_of = Some(attempt);
        self
    }

    /// Properties of the envelope's message: persistent, JSON, and the job id as
    /// `message_id`, the same on a job's first message, its retries and its dead letter.
    pub fn properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2) // persistent
            .with_content_type("application/json".into())
            .with_message_id(self.job_id.to_string().into())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes. This is a bug.")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix() {
        let topology =
            Topology { prefix: "t1".into(), queue_expires_ms: None, retry_tiers: vec![Duration::from_secs(5)] };
        assert_eq!(topology.retry_exchange(Duration::from_secs(5)), "t1.retry.5s");
        assert_eq!(topology.jobs_exchange(), "t1.jobs");
        assert_eq!(topology.job_queue("digits-cnn"), "t1.jobs.digits-cnn");
        assert_eq!(topology.dead_queue(), "t1.dead");
    }

    /// `rabbitmq/definitions.json` declares each queue as the services do: a broker that
    /// loaded it at boot would otherwise refuse their declarations (PRECONDITION_FAILED).
    #[test]
    fn the_definitions_file_declares_the_queues_as_the_services_do() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../rabbitmq/definitions.json");
        let definitions: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let as_json = |table: FieldTable| -> serde_json::Value {
            let fields = table.inner().iter().map(|(key, value)| {
                let value = match value {
                    AMQPValue::LongString(text) => serde_json::json!(text.to_string()),
                    AMQPValue::LongInt(number) => serde_json::json!(number),
                    other => panic!("no JSON form for {other:?}"),
                };
                (key.to_string(), value)
            });
            fields.collect::<serde_json::Map<_, _>>().into()
        };
        let topology = Topology::new(&Settings::default());
        let mut expected = std::collections::BTreeMap::new();
        expected.insert(topology.dead_queue(), as_json(topology.quorum_arguments()));
        for &delay in topology.retry_tiers() {
            expected.insert(topology.retry_queue(delay), as_json(topology.retry_queue_arguments(delay)));
        }
        for model in ["digits-cnn", "minilm-embed"] {
            expected.insert(topology.job_queue(model), as_json(topology.job_queue_arguments()));
        }
        let declared: std::collections::BTreeMap<String, serde_json::Value> = definitions["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|queue| (queue["name"].as_str().unwrap().to_owned(), queue["arguments"].clone()))
            .collect();
        assert_eq!(declared, expected);
    }

    #[test]
    fn envelope_round_trips() {
        for trace_id in [None, Some("req-42")] {
            let envelope = JobEnvelope::new(Uuid::now_v7(), "digits-cnn", trace_id);
            assert_eq!(JobEnvelope::from_bytes(&envelope.to_bytes()).ok(), Some(envelope));
        }
        // Messages published before trace ids were set still read.
        let old = br#"{"v":1,"job_id":"0190d1e4-0000-7000-8000-000000000000","model":"digits-cnn","trace_id":null}"#;
        assert_eq!(JobEnvelope::from_bytes(old).map(|e| e.trace_id).ok(), Some(None));
    }

    #[test]
    fn every_message_of_a_job_is_persistent_json_named_by_the_job_id() {
        let job_id = Uuid::now_v7();
        let first = JobEnvelope::new(job_id, "digits-cnn", None);
        for envelope in [first.clone(), first.retrying(2)] {
            let properties = envelope.properties();
            assert_eq!(*properties.delivery_mode(), Some(2));
            assert_eq!(properties.content_type().as_ref().map(|t| t.as_str()), Some("application/json"));
            assert_eq!(properties.message_id().as_ref().map(|id| id.to_string()), Some(job_id.to_string()));
        }
    }

    #[test]
    fn a_retry_names_its_failed_attempt_and_first_deliveries_stay_as_they_were() {
        let first = JobEnvelope::new(Uuid::now_v7(), "digits-cnn", None);
        assert!(!String::from_utf8_lossy(&first.to_bytes()).contains("retry_of"), "older workers read it unchanged");
        let retry = first.retrying(3);
        assert_eq!(JobEnvelope::from_bytes(&retry.to_bytes()).ok().and_then(|e| e.retry_of), Some(3));
    }
}
