//! The `Allow` header of a `405 Method Not Allowed`, which RFC 9110 requires: the methods
//! the path does take, read once from the OpenAPI description.

use poem::http::HeaderValue;

pub struct AllowedMethods {
    routes: Vec<(Vec<Segment>, HeaderValue)>,
}

#[derive(PartialEq)]
enum Segment {
    Literal(String),
    /// `{id}`: any one segment.
    Parameter,
}

impl AllowedMethods {
    /// Reads the paths and their methods from an OpenAPI document.
    pub fn from_spec(spec: &serde_json::Value) -> Self {
        let paths = spec["paths"].as_object().into_iter().flatten();
        let routes = paths
            .filter_map(|(path, operations)| {
                let mut methods: Vec<String> = operations.as_object()?.keys().map(|m| m.to_ascii_uppercase()).collect();
                methods.sort();
                let allow = HeaderValue::from_str(&methods.join(", ")).ok()?;
                Some((segments(path), allow))
            })
            .collect();
        Self { routes }
    }

    /// The methods `path` takes; a literal segment beats a parameter, as in the router
    /// (`/v1/webhooks/job-secret` is not `/v1/webhooks/{id}`).
    pub fn for_path(&self, path: &str) -> Option<&HeaderValue> {
        let wanted: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        self.routes
            .iter()
            .filter(|(route, _)| {
                route.len() == wanted.len()
                    && route.iter().zip(&wanted).all(|(segment, part)| match segment {
                        Segment::Literal(literal) => literal == part,
                        Segment::Parameter => !part.is_empty(),
                    })
            })
            .max_by_key(|(route, _)| route.iter().filter(|s| **s != Segment::Parameter).count())
            .map(|(_, allow)| allow)
    }
}

fn segments(path: &str) -> Vec<Segment> {
    path.trim_end_matches('/')
        .split('/')
        .map(|part| {
            if part.starts_with('{') && part.ends_with('}') {
                Segment::Parameter
            } else {
                Segment::Literal(part.to_owned())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lists_the_methods_of_the_matching_path() {
        let spec = json!({"paths": {
            "/v1/jobs": {"get": {}, "post": {}},
            "/v1/jobs/{id}": {"get": {}},
            "/v1/webhooks/{id}": {"get": {}, "patch": {}, "delete": {}},
            "/v1/webhooks/job-secret": {"get": {}},
        }});
        let allowed = AllowedMethods::from_spec(&spec);
        let allow = |path| allowed.for_path(path).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(allow("/v1/jobs").as_deref(), Some("GET, POST"));
        assert_eq!(allow("/v1/jobs/").as_deref(), Some("GET, POST"));
        assert_eq!(allow("/v1/jobs/abc").as_deref(), Some("GET"));
        assert_eq!(allow("/v1/webhooks/job-secret").as_deref(), Some("GET"));
        assert_eq!(allow("/v1/webhooks/7").as_deref(), Some("DELETE, GET, PATCH"));
        assert_eq!(allow("/v1/jobs/abc/more"), None);
        assert_eq!(allow("/elsewhere"), None);
    }
}
