//! Which tenant a Kafka request record belongs to. Ingest writes the caller's tenant into each
//! record's `tenant` field and seals it: the `reefline-tenant-seal` header holds an HMAC-SHA256,
//! under the operator's `TENANT_SECRET`, of the tenant and the request id. Classifiers and the sink
//! honour a record's tenant only under a valid seal; any other record (a camera producing straight
//! to the requests topic, or a forged field) belongs to the topic's tenant, `KAFKA_TENANT`.

use hmac::{Hmac, Mac};
use rdkafka::message::{Headers, OwnedHeaders};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::auth::DEFAULT_TENANT;

/// The header carrying a record's seal.
pub const SEAL_HEADER: &str = "reefline-tenant-seal";

/// How request records are told apart by tenant.
#[derive(Clone, clap::Args)]
pub struct TenantSettings {
    /// Secret shared by ingest, the classifiers and the sink: ingest seals each record's tenant with
    /// it, the others honour a tenant only under a valid seal. Required once keys name tenants.
    #[arg(long = "tenant-secret", env = "TENANT_SECRET", hide_env_values = true)]
    pub tenant_secret: Option<SecretString>,

    /// The tenant of request records produced straight to the requests topic (cameras), and of any
    /// record whose tenant is not sealed.
    #[arg(long = "kafka-tenant", env = "KAFKA_TENANT", default_value = DEFAULT_TENANT)]
    pub kafka_tenant: String,
}

impl std::fmt::Debug for TenantSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSettings")
            .field("tenant_secret", &self.tenant_secret.as_ref().map(|_| "<redacted>"))
            .field("kafka_tenant", &self.kafka_tenant)
            .finish()
    }
}

impl Default for TenantSettings {
    fn default() -> Self {
        Self { tenant_secret: None, kafka_tenant: DEFAULT_TENANT.to_owned() }
    }
}

/// Seals and checks records' tenants.
#[derive(Clone)]
pub struct TenantSeal {
    secret: Option<Vec<u8>>,
    kafka_tenant: String,
}

impl TenantSeal {
    pub fn new(settings: &TenantSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            crate::auth::is_tenant_name(&settings.kafka_tenant),
            "KAFKA_TENANT `{}` is not a tenant name (1 to 63 of a-z, 0-9, `_` and `-`)",
            settings.kafka_tenant
        );
        let secret = settings.tenant_secret.as_ref().map(|s| s.expose_secret().as_bytes().to_vec());
        anyhow::ensure!(secret.as_ref().is_none_or(|s| s.len() >= 16), "TENANT_SECRET must be at least 16 bytes");
        Ok(Self { secret, kafka_tenant: settings.kafka_tenant.clone() })
    }

    /// Whether records can carry a tenant other than `KAFKA_TENANT`.
    pub fn can_seal(&self) -> bool {
        self.secret.is_some()
    }

    /// The tenant of records that carry no valid seal.
    pub fn kafka_tenant(&self) -> &str {
        &self.kafka_tenant
    }

    fn mac(secret: &[u8], tenant: &str, request_id: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(tenant.as_bytes());
        mac.update(&[0]);
        mac.update(request_id.as_bytes());
        mac
    }

    /// The seal of `tenant` on the record of `request_id`, as its header's value; `None` without a secret.
    pub fn seal(&self, tenant: &str, request_id: &str) -> Option<String> {
        let secret = self.secret.as_ref()?;
        Some(hex::encode(Self::mac(secret, tenant, request_id).finalize().into_bytes()))
    }

    /// `headers` with the seal of `tenant` added (unchanged without a secret).
    pub fn add_to(&self, headers: OwnedHeaders, tenant: &str, request_id: &str) -> OwnedHeaders {
        match self.seal(tenant, request_id) {
            Some(seal) => headers.insert(rdkafka::message::Header { key: SEAL_HEADER, value: Some(&seal) }),
            None => headers,
        }
    }

    /// The tenant a record of `request_id` claiming `claimed` belongs to: the claim under a valid
    /// seal (from `headers`); `KAFKA_TENANT` for a record that claims no tenant or that one. A
    /// record that claims another tenant without a valid seal is refused (`Err`, the reason): a
    /// forged claim, or a service whose `TENANT_SECRET` differs from ingest's, which must not
    /// hand one tenant's work to another.
    pub fn tenant_of<H: Headers + ?Sized>(
        &self,
        claimed: Option<&str>,
        request_id: &str,
        headers: Option<&H>,
    ) -> Result<String, String> {
        let Some(claimed) = claimed.filter(|c| *c != self.kafka_tenant) else { return Ok(self.kafka_tenant.clone()) };
        let seal = headers.and_then(|headers| {
            (0..headers.count()).filter_map(|i| headers.try_get(i)).find(|h| h.key == SEAL_HEADER)?.value
        });
        let valid = match (&self.secret, seal) {
            (Some(secret), Some(seal)) => {
                hex::decode(seal).is_ok_and(|seal| Self::mac(secret, claimed, request_id).verify_slice(&seal).is_ok())
            }
            _ => false,
        };
        if valid {
            return Ok(claimed.to_owned());
        }
        Err(match (&self.secret, seal) {
            (None, _) => {
                format!("the record claims tenant `{claimed}`, and this service has no TENANT_SECRET to check its seal")
            }
            (Some(_), None) => format!("the record claims tenant `{claimed}` without ingest's seal"),
            (Some(_), Some(_)) => format!("the record claims tenant `{claimed}` under a seal that does not match"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(secret: Option<&str>) -> TenantSeal {
        TenantSeal::new(&TenantSettings { tenant_secret: secret.map(Into::into), kafka_tenant: "cameras".into() })
            .unwrap()
    }

    #[test]
    fn only_a_sealed_tenant_is_honoured() {
        let ingest = seal(Some("a secret of sixteen bytes"));
        let headers = ingest.add_to(OwnedHeaders::new(), "reef", "req-1");
        assert_eq!(ingest.tenant_of(Some("reef"), "req-1", Some(&headers)), Ok("reef".into()));
        // No claim, or the topic's own tenant: the topic's tenant.
        assert_eq!(ingest.tenant_of(None, "req-1", Some(&headers)), Ok("cameras".into()));
        assert_eq!(ingest.tenant_of(Some("cameras"), "req-9", None::<&OwnedHeaders>), Ok("cameras".into()));
        // A forged claim, a seal moved to another record, a record with no seal: refused.
        assert!(ingest.tenant_of(Some("kelp"), "req-1", Some(&headers)).unwrap_err().contains("does not match"));
        assert!(ingest.tenant_of(Some("reef"), "req-2", Some(&headers)).is_err());
        assert!(ingest.tenant_of(Some("reef"), "req-1", None::<&OwnedHeaders>).unwrap_err().contains("without"));
        // Another secret, or none, honours nothing.
        assert!(seal(Some("another secret, sixteen")).tenant_of(Some("reef"), "req-1", Some(&headers)).is_err());
        assert!(seal(None).tenant_of(Some("reef"), "req-1", Some(&headers)).unwrap_err().contains("no TENANT_SECRET"));
        assert!(seal(None).seal("reef", "req-1").is_none());
    }

    #[test]
    fn settings_are_checked() {
        let short = TenantSettings { tenant_secret: Some("short".into()), kafka_tenant: "default".into() };
        assert!(TenantSeal::new(&short).is_err());
        let bad = TenantSettings { tenant_secret: None, kafka_tenant: "Cameras!".into() };
        assert!(TenantSeal::new(&bad).is_err());
        assert!(
            !format!("{:?}", TenantSettings { tenant_secret: Some("sekrit".into()), ..Default::default() })
                .contains("sekrit")
        );
    }
}
