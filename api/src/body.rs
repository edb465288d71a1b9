//! `JsonBody<T>`: poem-openapi's `Json<T>` request payload, with errors that name the field.
//!
//! poem-openapi refuses a body that does not fit its type with the type's name, not the
//! field's: a missing `scopes` reads `Expected input type "list_string", found null
//! (occurred while parsing "CreateTokenRequest")`. On that error path only, this payload
//! walks the body against the type's OpenAPI schema and answers `400 invalid_body` with a
//! JSON pointer to the first field that does not fit. It documents itself exactly as
//! `Json<T>` does.

use std::ops::Deref;

use poem::{FromRequest, Request, RequestBody};
use poem_openapi::payload::{ParsePayload, Payload};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef, Registry};
use poem_openapi::types::{ParseFromJSON, Type};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde_json::Value;

use crate::error::{ApiError, FieldError};

/// A JSON request body of type `T`.
pub struct JsonBody<T>(pub T);

impl<T> Deref for JsonBody<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = <poem_openapi::payload::Json<T> as Payload>::CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        <poem_openapi::payload::Json<T> as Payload>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: ParseFromJSON> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = T::IS_REQUIRED;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let data = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        let value = parse_json(&data)?;
        match T::parse_from_json(Some(value)) {
            Ok(parsed) => Ok(Self(parsed)),
            Err(error) => {
                // Parsed again rather than cloned up front: only refused bodies pay for it.
                let value = parse_json(&data)?;
                let mut registry = Registry::new();
                T::register(&mut registry);
                let located = locate(&value, &T::schema_ref(), &registry, String::new());
                Err(ApiError::InvalidBody { detail: error.into_message(), errors: located.into_iter().collect() }
                    .into())
            }
        }
    }
}

fn parse_json(data: &[u8]) -> Result<Value, ApiError> {
    if data.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(data).map_err(|e| ApiError::InvalidBody { detail: e.to_string(), errors: Vec::new() })
}

/// The same extractor poem-openapi derives for its own payloads (its macro is private).
impl<'a, T: ParseFromJSON> ApiExtractor<'a> for JsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }

    fn request_meta() -> Option<poem_openapi::registry::MetaRequest> {
        Some(poem_openapi::registry::MetaRequest {
            description: None,
            content: vec![poem_openapi::registry::MetaMediaType {
                content_type: <Self as Payload>::CONTENT_TYPE,
                schema: <Self as Payload>::schema_ref(),
            }],
            required: <Self as ParsePayload>::IS_REQUIRED,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        match request.content_type() {
            Some(content_type) if <Self as Payload>::check_content_type(content_type) => {}
            Some(content_type) => {
                return Err(poem_openapi::error::ContentTypeError::NotSupported {
                    content_type: content_type.to_owned(),
                }
                .into());
            }
            None => return Err(poem_openapi::error::ContentTypeError::ExpectContentType.into()),
        }
        <Self as ParsePayload>::from_request(request, body).await
    }
}

/// The first place where `value` departs from `schema`, as a JSON pointer and what was
/// expected there. Checks what poem-openapi checks (presence, JSON types, lengths,
/// bounds, enumerations); `None` when it finds nothing, and the caller falls back to
/// poem-openapi's own message.
fn locate(value: &Value, schema: &MetaSchemaRef, registry: &Registry, pointer: String) -> Option<FieldError> {
    let schema: &MetaSchema = match schema {
        MetaSchemaRef::Inline(schema) => schema,
        MetaSchemaRef::Reference(name) => registry.schemas.get(name)?,
    };
    // A documented reference is an `allOf` of one.
    for part in &schema.all_of {
        if let Some(found) = locate(value, part, registry, pointer.clone()) {
            return Some(found);
        }
    }
    if value.is_null() && schema.nullable {
        return None;
    }
    let wrong = |expected: &str| Some(FieldError { pointer: pointer.clone(), detail: expected.to_owned() });
    if !schema.enum_items.is_empty() && !schema.enum_items.contains(value) {
        let choices: Vec<String> = schema.enum_items.iter().map(Value::to_string).collect();
        return wrong(&format!("must be one of {}", choices.join(", ")));
    }
    match schema.ty {
        "object" => {
            let Some(fields) = value.as_object() else { return wrong("must be an object") };
            for (name, field_schema) in &schema.properties {
                let field_pointer = format!("{pointer}/{}", escape(name));
                match fields.get(*name) {
                    None | Some(Value::Null) if schema.required.contains(name) => {
                        return Some(FieldError { pointer: field_pointer, detail: "is required".to_owned() });
                    }
                    None | Some(Value::Null) => {}
                    Some(field) => {
                        if let Some(found) = locate(field, field_schema, registry, field_pointer) {
                            return Some(found);
                        }
                    }
                }
            }
            let additional = schema.additional_properties.as_deref()?;
            fields
                .iter()
                .find_map(|(name, field)| locate(field, additional, registry, format!("{pointer}/{}", escape(name))))
        }
        "array" => {
            let Some(items) = value.as_array() else { return wrong("must be an array") };
            if let Some(max) = schema.max_items.filter(|max| items.len() > *max) {
                return wrong(&format!("may hold at most {max} items, has {}", items.len()));
            }
            if let Some(min) = schema.min_items.filter(|min| items.len() < *min) {
                return wrong(&format!("must hold at least {min} items, has {}", items.len()));
            }
            let item_schema = schema.items.as_deref()?;
            items.iter().enumerate().find_map(|(i, item)| locate(item, item_schema, registry, format!("{pointer}/{i}")))
        }
        "string" => {
            let text = match value {
                Value::String(text) => text,
                // poem-openapi takes a number or a boolean for a string, as its text.
                Value::Number(_) | Value::Bool(_) => return None,
                _ => return wrong("must be a string"),
            };
            let length = text.chars().count();
            if let Some(max) = schema.max_length.filter(|max| length > *max) {
                return wrong(&format!("may be at most {max} characters, is {length}"));
            }
            if let Some(min) = schema.min_length.filter(|min| length < *min) {
                return wrong(&format!("must be at least {min} characters, is {length}"));
            }
            match schema.format {
                Some("uuid") if uuid::Uuid::parse_str(text).is_err() => wrong("must be a UUID"),
                Some("date-time") if chrono::DateTime::parse_from_rfc3339(text).is_err() => {
                    wrong("must be an RFC 3339 date-time")
                }
                _ => None,
            }
        }
        "integer" | "number" => {
            let unsigned = matches!(schema.format, Some(f) if f.starts_with('u')); // uint32, uint64
            let (fits, expected) = match (schema.ty, unsigned) {
                ("number", _) => (value.is_number(), "a number"),
                (_, true) => (value.is_u64(), "a non-negative integer"),
                _ => (value.is_i64() || value.is_u64(), "an integer"),
            };
            if !fits {
                return wrong(&format!("must be {expected}"));
            }
            let number = value.as_f64()?;
            if let Some(max) = schema.maximum.filter(|max| number > *max) {
                return wrong(&format!("may be at most {max}"));
            }
            if let Some(min) = schema.minimum.filter(|min| number < *min) {
                return wrong(&format!("must be at least {min}"));
            }
            None
        }
        "boolean" if !value.is_boolean() => wrong("must be true or false"),
        _ => None,
    }
}

/// RFC 6901: `~` and `/` in a key are written `~0` and `~1`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use poem_openapi::Object;
    use serde_json::json;

    use super::*;

    #[derive(Object)]
    struct Inner {
        #[oai(validator(max_length = 3))]
        tag: String,
    }

    #[derive(Object)]
    struct Outer {
        name: String,
        scopes: Vec<String>,
        #[oai(validator(minimum(value = "1"), maximum(value = "10")))]
        count: Option<u64>,
        /// Documented, so poem-openapi wraps the reference in an `allOf`.
        inner: Option<Inner>,
        items: Vec<Inner>,
        any: Option<Value>,
    }

    fn located(value: Value) -> Option<(String, String)> {
        let mut registry = Registry::new();
        Outer::register(&mut registry);
        assert!(Outer::parse_from_json(Some(value.clone())).is_err(), "poem-openapi refuses {value} too");
        locate(&value, &Outer::schema_ref(), &registry, String::new()).map(|e| (e.pointer, e.detail))
    }

    fn at(pointer: &str, detail: &str) -> Option<(String, String)> {
        Some((pointer.to_owned(), detail.to_owned()))
    }

    #[test]
    fn names_the_first_field_that_does_not_fit() {
        let valid = json!({"name": "n", "scopes": [], "items": [], "any": [1, "x"]});
        assert!(Outer::parse_from_json(Some(valid)).is_ok());

        assert_eq!(located(json!({"name": "n", "items": []})), at("/scopes", "is required"));
        assert_eq!(located(json!({"name": "n", "scopes": null, "items": []})), at("/scopes", "is required"));
        assert_eq!(located(json!({"name": "n", "scopes": "a", "items": []})), at("/scopes", "must be an array"));
        assert_eq!(
            located(json!({"name": "n", "scopes": ["a", {}], "items": []})),
            at("/scopes/1", "must be a string")
        );
        assert_eq!(
            located(json!({"name": "n", "scopes": [], "items": [], "count": 11})),
            at("/count", "may be at most 10")
        );
        assert_eq!(
            located(json!({"name": "n", "scopes": [], "items": [], "count": -1})),
            at("/count", "must be a non-negative integer")
        );
        assert_eq!(
            located(json!({"name": "n", "scopes": [], "items": [], "count": 1.5})),
            at("/count", "must be a non-negative integer")
        );
        assert_eq!(
            located(json!({"name": "n", "scopes": [], "items": [], "inner": {"tag": "long"}})),
            at("/inner/tag", "may be at most 3 characters, is 4")
        );
        assert_eq!(
            located(json!({"name": "n", "scopes": [], "items": [{"tag": "ok"}, {}]})),
            at("/items/1/tag", "is required")
        );
        assert_eq!(located(json!([1])), at("", "must be an object"));
        assert_eq!(located(Value::Null), at("", "must be an object"));
    }

    #[test]
    fn pointers_escape_keys() {
        assert_eq!(escape("a/b~c"), "a~1b~0c");
    }
}
