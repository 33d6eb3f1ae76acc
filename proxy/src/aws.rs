//! AWS access shared by the Secrets Manager provider and IAM token logins: the SDK's
//! standard credential chain (environment, shared config and credentials files, web
//! identity, ECS, and on EC2 the instance metadata service with IMDSv2) over rustls with
//! ring, the crypto dbproxy's own TLS uses.

use aws_config::{BehaviorVersion, Region, SdkConfig};

/// The SDK configuration: `region` and `endpoint_url` when given, the chain's otherwise.
pub async fn sdk_config(region: &str, endpoint_url: &str) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if !region.is_empty() {
        loader = loader.region(Region::new(region.to_string()));
    }
    if !endpoint_url.is_empty() {
        loader = loader.endpoint_url(endpoint_url);
    }
    loader.load().await
}

/// An SDK error in a line: the service's code and message, or (no answer) the causes.
pub fn describe<E, R>(e: &aws_sdk_secretsmanager::error::SdkError<E, R>) -> String
where
    E: aws_sdk_secretsmanager::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_secretsmanager::error::SdkError;
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("(no message)")
            )
        }
        _ => {
            // Display of each cause, without the Debug dump DisplayErrorContext appends.
            let mut out = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let s = c.to_string();
                if !out.contains(&s) {
                    out.push_str(": ");
                    out.push_str(&s);
                }
                cause = c.source();
            }
            out
        }
    }
}
