//! dynamo-runtime
