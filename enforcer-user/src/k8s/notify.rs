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

/// What imds-guard did, the Events' `action`: refused the attempt, let it
/// through in audit mode, ignored the pod's label.
pub const ACTION_REFUSE: &str = "Refuse";
pub const ACTION_AUDIT: &str = "Audit";
pub const ACTION_IGNORE_LABEL: &str = "IgnoreLabel";

/// The Events' reporting controller.
pub const CONTROLLER: &str = "imds-guard";

/// Notices waiting for the API server at most; past it they are dropped
/// (the log and the metrics still have them).
pub const QUEUE: usize = 256;

/// The pod an Event is about, as the Events' `regarding`.
pub fn reference(pod: &PodRef) -> ObjectReference {
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
                action: ACTION_REFUSE.to_owned(),
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
                action: ACTION_AUDIT.to_owned(),
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
                action: ACTION_IGNORE_LABEL.to_owned(),
                secondary: None,
            },
            pod,
        ),
    }
}

/// The recorder that publishes the Events, reported by imds-guard on `node`.
pub fn recorder(client: Client, node: String) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.to_owned(),
            instance: Some(node),
        },
    )
}

/// Publishes the Event for one notice.
pub async fn send(recorder: &Recorder, notice: &PodNotice) -> Result<(), kube::Error> {
    let (event, pod) = event_for(notice);
    recorder.publish(&event, &reference(pod)).await
}

/// Publishes notices as Events, reported by imds-guard on `node`.
pub async fn publish(client: Client, node: String, mut notices: mpsc::Receiver<PodNotice>) {
    let recorder = recorder(client, node);
    while let Some(notice) = notices.recv().await {
        if let Err(err) = send(&recorder, &notice).await {
            let pod = notice.pod();
            warn!(namespace = %pod.namespace, pod = %pod.name, "cannot publish a Kubernetes Event: {err}");
        }
    }
}
