//! The `aws_secrets_manager` provider: GetSecretValue, signed by the SDK with credentials
//! from the standard chain, for the AWSCURRENT stage and, after the database refused a
//! login, also AWSPENDING and AWSPREVIOUS (a rotation in progress, in either order).

use super::{parse, Secret, SecretError, Versions};
use crate::config::SecretConfig;
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
use aws_sdk_secretsmanager::Client;

/// A Secrets Manager client for one `[[secrets]]` entry.
pub async fn client(spec: &SecretConfig) -> Client {
    Client::new(&crate::aws::sdk_config(&spec.region, &spec.endpoint_url).await)
}

/// Reads the secret: AWSCURRENT, and with `all` the pending and previous versions too.
pub async fn fetch(
    client: &Client,
    spec: &SecretConfig,
    all: bool,
) -> Result<Versions, SecretError> {
    let current = stage(client, spec, "AWSCURRENT")
        .await?
        .ok_or_else(|| SecretError::Aws {
            secret_id: spec.secret_id.clone(),
            why: "it has no AWSCURRENT version".into(),
        })?;
    let mut v = Versions::only(current);
    if all {
        v.pending = stage(client, spec, "AWSPENDING").await?;
        v.previous = stage(client, spec, "AWSPREVIOUS").await?;
    }
    Ok(v)
}

/// One stage's value; `None` when no version carries it.
async fn stage(
    client: &Client,
    spec: &SecretConfig,
    stage: &str,
) -> Result<Option<Secret>, SecretError> {
    let err = |why: String| SecretError::Aws {
        secret_id: spec.secret_id.clone(),
        why,
    };
    let out = client
        .get_secret_value()
        .secret_id(&spec.secret_id)
        .version_stage(stage)
        .send()
        .await;
    let out = match out {
        Ok(o) => o,
        // A stage no version carries is "not found"; so is a secret that does not exist,
        // which the AWSCURRENT read reports.
        Err(e)
            if stage != "AWSCURRENT"
                && matches!(
                    e.as_service_error(),
                    Some(GetSecretValueError::ResourceNotFoundException(_))
                ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(err(crate::aws::describe(&e))),
    };
    let text = match (out.secret_string(), out.secret_binary()) {
        (Some(s), _) => s.to_string(),
        (None, Some(b)) => String::from_utf8(b.as_ref().to_vec())
            .map_err(|_| err(format!("its {stage} value is binary, not text")))?,
        (None, None) => return Err(err(format!("its {stage} version has no value"))),
    };
    parse(&text)
        .map(Some)
        .map_err(|e| err(format!("{stage}: {e}")))
}
