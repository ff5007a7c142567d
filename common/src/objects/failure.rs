//! What a store's refusal or failure means, in the kinds image results use, with the store's own
//! code and never its address.

/// Why an object could not be read, in the kinds image results use.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    NotFound,
    /// The store refused the credentials, or they do not allow reading it.
    Forbidden(String),
    /// Another error status from the store.
    Status(u16, String),
    Timeout,
    /// No answer: the connection failed or broke.
    Connection(String),
    /// Anything else (an unusable key, say): not worth trying again.
    Other(String),
}

impl Failure {
    /// What went wrong with a read or a listing.
    pub fn of(e: &object_store::Error) -> Self {
        use object_store::client::{HttpError, HttpErrorKind};
        // The error's text names the store's address: results and answers get the kind of
        // failure and the store's own code instead.
        let full = text(e);
        let detail = summary(&full);
        match e {
            object_store::Error::NotFound { .. } => return Failure::NotFound,
            object_store::Error::PermissionDenied { .. } => {
                return Failure::Forbidden(format!("the store answered 403 Forbidden{detail}"));
            }
            object_store::Error::Unauthenticated { .. } => {
                return Failure::Forbidden(format!("the store answered 401 Unauthorized{detail}"));
            }
            object_store::Error::Generic { .. } => {}
            _ => return Failure::Other(format!("the store's client refused the request{detail}")),
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(http) = s.downcast_ref::<HttpError>() {
                return match http.kind() {
                    HttpErrorKind::Timeout => Failure::Timeout,
                    HttpErrorKind::Connect => Failure::Connection("could not connect to the store".into()),
                    HttpErrorKind::Request | HttpErrorKind::Interrupted => {
                        Failure::Connection("the connection to the store broke off".into())
                    }
                    _ => Failure::Other("the store's answer could not be read".into()),
                };
            }
            source = s.source();
        }
        // The client's error for a status is not public; its text carries the status.
        match status_in(&full) {
            Some(code) => Failure::Status(code, format!("the store answered HTTP {code}{detail}")),
            None => Failure::Other(format!("the store's answer could not be used{detail}")),
        }
    }
}

/// The status in an object_store error's text ("... non-2xx status code: 503 Service Unavailable").
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// An error with its causes, in one line.
fn text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

/// The `<Code>` and `<Message>` (its first line) of an S3 or Azure error body, as ` (Code: Message)`.
fn summary(body: &str) -> String {
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find("</")? + start;
        Some(body[start..end].to_owned())
    };
    // Azure's message runs on with its request id and time on lines of their own.
    let message = field("Message").map(|m| m.lines().next().unwrap_or_default().trim().to_owned());
    match (field("Code"), message) {
        (Some(code), Some(message)) => format!(" ({code}: {message})"),
        (Some(code), None) => format!(" ({code})"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_error_bodies_are_summarised() {
        let body = "<?xml version=\"1.0\"?><Error><Code>InvalidAccessKeyId</Code><Message>The key does not exist.</Message></Error>";
        assert_eq!(summary(body), " (InvalidAccessKeyId: The key does not exist.)");
        assert_eq!(summary("not xml"), "");
        let azure = "<Error><Code>AuthenticationFailed</Code><Message>Server failed to authenticate the request.\nRequestId:1\nTime:2026</Message></Error>";
        assert_eq!(summary(azure), " (AuthenticationFailed: Server failed to authenticate the request.)");
        let text = "Error performing GET http://127.0.0.1:1/b/k in 2ms - Server returned non-2xx status code: 503 Service Unavailable: ";
        assert_eq!(status_in(text), Some(503));
        assert_eq!(status_in("connection refused"), None);
    }
}
