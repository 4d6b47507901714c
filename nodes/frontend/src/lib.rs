//! dynamo-frontend
