//! Clients of the gateway send their API key as `authorization: Bearer <key>` on every call.

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds the API key to every call; without a key, calls go out as they are.
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// An interceptor sending `key` (none if `None` or empty).
    pub fn new(key: Option<&str>) -> anyhow::Result<Self> {
        let key = key.map(str::trim).filter(|k| !k.is_empty());
        let value = match key {
            None => None,
            Some(key) => {
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {key}")).map_err(|_| {
                        anyhow::anyhow!("the API key holds characters a header cannot carry")
                    })?;
                // Kept out of debug output and HPACK tables.
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Self(value))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to the gateway that sends an API key.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Wraps `channel` so that every call carries `key`.
pub fn authed(channel: Channel, key: Option<&str>) -> anyhow::Result<Authed> {
    Ok(InterceptedService::new(channel, Bearer::new(key)?))
}
