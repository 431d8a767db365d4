//! Bearer-token authentication: every call must carry `authorization: Bearer TOKEN`.

use std::sync::Arc;

use tonic::{Request, Status};

/// A tonic interceptor accepting only calls that present the configured token.
#[derive(Clone)]
pub struct TokenCheck {
    expected: Option<Arc<Vec<u8>>>,
}

impl TokenCheck {
    /// Checks for `token`; `None` lets every call through.
    pub fn new(token: Option<&str>) -> Self {
        TokenCheck { expected: token.map(|t| Arc::new(format!("Bearer {}", t.trim()).into_bytes())) }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(req) };
        let given = req.metadata().get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
        // Compare every byte whatever the first difference, so timing tells nothing.
        let same = given.len() == expected.len()
            && given.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated("a valid `authorization: Bearer TOKEN` header is required"))
        }
    }
}
