//! Kubernetes Events on pods: `MetadataAccessBlocked`,
//! `MetadataAccessAudited` and `MetadataAccessLabelIgnored`. The reporter
//! sends only the first attempt of a window, and kube's recorder folds
//! repeats into one Event's series, so a pod that retries every second
//! does not flood the API server.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::report::events::{PodNotice, PodRef};

pub const REASON_BLOCKED: &str = "MetadataAccessBlocked";
pub const REASON_AUDITED: &str = "MetadataAccessAudited";
pub const REASON_LABEL_IGNORED: &str = "MetadataAccessLabelIgnored";

/// Notices waiting for the API server at most; past it they are dropped
/// (the log and the metrics still have them).
pub const QUEUE: usize = 256;

fn reference(pod: &PodRef) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: Some(pod.uid.clone()),
        ..ObjectReference::default()
    }
}

/// The Event for a notice, and the pod it is about.
pub fn event_for(notice: &PodNotice) -> (Event, &PodRef) {
    match notice {
        PodNotice::Attempt {
            pod,
            destination,
            audited: false,
        } => (
            Event {
                type_: EventType::Warning,
                reason: REASON_BLOCKED.to_owned(),
                note: Some(format!(
                    "imds-guard refused an attempt to reach the metadata address {destination}"
                )),
                action: "Refuse".to_owned(),
                secondary: None,
            },
            pod,
        ),
        PodNotice::Attempt {
            pod,
            destination,
            audited: true,
        } => (
            Event {
                type_: EventType::Warning,
                reason: REASON_AUDITED.to_owned(),
                note: Some(format!(
                    "audit mode: imds-guard let through an attempt to reach the metadata address {destination}"
                )),
                action: "Audit".to_owned(),
                secondary: None,
            },
            pod,
        ),
        PodNotice::LabelIgnored { pod } => (
            Event {
                type_: EventType::Warning,
                reason: REASON_LABEL_IGNORED.to_owned(),
                note: Some(format!(
                    "the pod asks for metadata access, but namespace {} does not permit it: it stays blocked",
                    pod.namespace
                )),
                action: "IgnoreLabel".to_owned(),
                secondary: None,
            },
            pod,
        ),
    }
}

/// Publishes notices as Events, reported by `imds-guard` on `node`.
pub async fn publish(client: Client, node: String, mut notices: mpsc::Receiver<PodNotice>) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "imds-guard".to_owned(),
            instance: Some(node),
        },
    );
    while let Some(notice) = notices.recv().await {
        let (event, pod) = event_for(&notice);
        if let Err(err) = recorder.publish(&event, &reference(pod)).await {
            warn!(namespace = %pod.namespace, pod = %pod.name, "cannot publish a Kubernetes Event: {err}");
        }
    }
}
