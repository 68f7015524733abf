//! Test support: a KMS client for testkit's moto server (fake AWS KMS, started on a free loopback
//! port and killed on drop), and small helpers shared by the test binaries.

#![allow(dead_code, unreachable_pub)]

pub use spendguard_testkit::moto::{MotoServer, REGION};

/// A KMS client for moto with static test credentials (no AWS chain involved).
pub trait KmsClient {
    /// The client.
    fn client(&self) -> aws_sdk_kms::Client;
}

impl KmsClient for MotoServer {
    fn client(&self) -> aws_sdk_kms::Client {
        use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.endpoint())
            .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
            .http_client(spendguard_evidence::kms::https_client())
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }
}

/// Creates a KMS key with the given spec for signing; returns its key id.
pub async fn create_signing_key(
    client: &aws_sdk_kms::Client,
    spec: aws_sdk_kms::types::KeySpec,
) -> String {
    let output = client
        .create_key()
        .key_spec(spec)
        .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
        .description("spendguard evidence test")
        .send()
        .await
        .expect("CreateKey");
    output
        .key_metadata()
        .expect("CreateKey returns metadata")
        .key_id()
        .to_owned()
}

/// The key's DER SubjectPublicKeyInfo, fetched independently of the signer.
pub async fn public_key_spki(client: &aws_sdk_kms::Client, key_id: &str) -> Vec<u8> {
    client
        .get_public_key()
        .key_id(key_id)
        .send()
        .await
        .expect("GetPublicKey")
        .public_key()
        .expect("public key")
        .as_ref()
        .to_vec()
}

/// A realistic canonical audit event (the exact bytes the ledger signs).
pub fn audit_event(sequence: u64, note: &str) -> Vec<u8> {
    use spendguard_core::audit::{EventDraft, ProducerStamp};
    let draft = EventDraft {
        tenant_id: "tenant-a".into(),
        event_type: "reservation.reserved",
        data: serde_json::json!({
            "reservation_id": "5b3c0f1e-8a41-4a5e-9d1e-2f9a1c3b7d10",
            "budget_id": "team-search",
            "amount_nano_usd": "1250000",
            "note": note,
        }),
    };
    let stamp = ProducerStamp {
        producer_instance_id: "ledger-0".into(),
        producer_sequence: sequence,
        occurred_at: chrono::DateTime::from_timestamp_millis(1_767_225_600_000).expect("time"),
    };
    draft.stamp(&stamp).expect("canonical event").bytes
}
