//! The disaggregated router against fake prefill and decode workers.
