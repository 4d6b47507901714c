//! dynamo-mocker
