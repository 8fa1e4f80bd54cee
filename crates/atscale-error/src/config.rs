//! The layer's configuration: service name, help link template, exposure of details.

use std::fmt;
use std::sync::Arc;

use atscale_core::Kind;

use crate::error::{ConfigError, ErrorId};

/// Everything an [`ErrorEnrichLayer`](crate::ErrorEnrichLayer) was built with,
/// shared by every service it makes.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) service: Arc<str>,
    pub(crate) help: Option<HelpTemplate>,
    pub(crate) internal_details: bool,
}

impl Config {
    pub(crate) fn new(
        service: Arc<str>,
        help: Option<HelpTemplate>,
        internal_details: bool,
    ) -> Result<Self, ConfigError> {
        check_service_name(&service)?;
        Ok(Config {
            service,
            help,
            internal_details,
        })
    }
}

/// The longest service name accepted (it ends up in headers, logs and gRPC details).
const MAX_SERVICE_NAME: usize = 128;

fn check_service_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::service_name(name, "it is empty"));
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(ConfigError::service_name(
            name,
            "it is longer than 128 bytes",
        ));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::service_name(
            name,
            "it contains whitespace or control characters",
        ));
    }
    Ok(())
}

/// A parsed help link template such as `https://docs.example.com/errors/{code}`.
///
/// `{code}` becomes the kind's stable name ([`Kind::as_str`]), `{id}` the error id.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct HelpTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Code,
    Id,
}

impl HelpTemplate {
    /// Parses and checks `template`: only `{code}` and `{id}` placeholders,
    /// and the result must be an absolute `http` or `https` URI.
    pub(crate) fn parse(template: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &'static str| ConfigError::help_link(template, reason);
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(invalid("it has a `}` without a matching `{`"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| invalid("it has a `{` without a matching `}`"))?;
            parts.push(match &after[..close] {
                "code" => Part::Code,
                "id" => Part::Id,
                _ => {
                    return Err(invalid(
                        "only the `{code}` and `{id}` placeholders are known",
                    ));
                }
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let help = HelpTemplate {
            source: template.to_owned(),
            parts,
        };
        // Every kind name and every id is made of URI-safe characters, so one
        // sample rendering checks them all.
        let sample = help.render(Kind::DeadlineExceeded, ErrorId::from_u128(u128::MAX));
        let uri: http::Uri = sample
            .parse()
            .map_err(|_| invalid("it does not make a valid URI"))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.authority().is_some() => Ok(help),
            _ => Err(invalid(
                "it must make an absolute `http` or `https` URI with a host",
            )),
        }
    }

    /// The link for an error of `kind` with `id`.
    pub(crate) fn render(&self, kind: Kind, id: ErrorId) -> String {
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Code => out.push_str(kind.as_str()),
                Part::Id => out.push_str(&id.to_string()),
            }
        }
        out
    }
}

impl fmt::Debug for HelpTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HelpTemplate").field(&self.source).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_code_and_id() {
        let t = HelpTemplate::parse("https://docs.example.com/errors/{code}?ref={id}").unwrap();
        let id = ErrorId::from_u128(0xabc);
        assert_eq!(
            t.render(Kind::RateLimited, id),
            "https://docs.example.com/errors/rate_limited?ref=00000000000000000000000000000abc"
        );
        let plain = HelpTemplate::parse("https://docs.example.com/errors").unwrap();
        assert_eq!(
            plain.render(Kind::Internal, id),
            "https://docs.example.com/errors"
        );
    }

    #[test]
    fn rejects_bad_templates_with_a_reason() {
        for (template, reason) in [
            ("https://x.test/{kind}", "placeholders"),
            ("https://x.test/{code", "without a matching `}`"),
            ("https://x.test/code}", "without a matching `{`"),
            ("/errors/{code}", "absolute"),
            ("ftp://x.test/{code}", "absolute"),
            ("https://x.test/a b/{code}", "valid URI"),
            ("", "valid URI"),
        ] {
            let err = HelpTemplate::parse(template).unwrap_err().to_string();
            assert!(err.contains(reason), "{template:?}: {err}");
            assert!(err.contains("help link"), "{err}");
        }
    }

    #[test]
    fn service_names_are_checked() {
        assert!(check_service_name("checkout").is_ok());
        assert!(check_service_name("grpc.health.v1").is_ok());
        for bad in ["", "check out", "a\nb", &"x".repeat(129)] {
            let err = check_service_name(bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid service name"), "{err}");
        }
    }
}
