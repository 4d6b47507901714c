//! dynamo-preprocessor
