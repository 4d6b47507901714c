//! dynamo-router
