//! What a portal does with a user's fleet: the commands it sends (about 15 % creates, 35 %
//! starts, 35 % stops, 8 % resizes, 7 % deletes), each chosen to fit what it knows of the
//! fleet, and that knowledge kept up to date from the answers.

use rand::Rng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

/// A portal command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Create,
    Start,
    Stop,
    Resize,
    Delete,
}

/// A device a portal client knows of, and whether it last saw it running.
#[derive(Debug, Clone, Copy)]
pub struct Device {
    pub id: Uuid,
    pub running: bool,
}

/// The portal command a client sends next, chosen to fit what it knows of the user's fleet.
#[derive(Debug, Clone, Copy)]
pub struct PortalCommand {
    pub operation: Operation,
    /// Which of the fleet's devices the command is about; `None` for a create.
    device: Option<usize>,
}

impl PortalCommand {
    /// About 15 % creates, 35 % starts, 35 % stops, 8 % resizes, 7 % deletes once the user has
    /// two devices; a create before that. Returns the command and its request, without auth.
    pub fn choose(
        rng: &mut StdRng,
        client: &reqwest::Client,
        base: &str,
        fleet: &[Device],
    ) -> (Self, reqwest::RequestBuilder) {
        let roll = rng.random_range(0..100);
        if fleet.len() < 2 || roll < 15 {
            let body = json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
            let command = PortalCommand {
                operation: Operation::Create,
                device: None,
            };
            return (command, client.post(format!("{base}/v1/devices")).json(&body));
        }
        let index = rng.random_range(0..fleet.len());
        let Device { id, running } = fleet[index];
        let (operation, request) = match (running, roll) {
            (_, 15..=21) => (Operation::Delete, client.delete(format!("{base}/v1/devices/{id}"))),
            (true, _) => (Operation::Stop, client.post(format!("{base}/v1/devices/{id}/stop"))),
            (false, 22..=29) => {
                let cores = [2, 4][rng.random_range(0..2)];
                let body = json!({"cpu_cores": cores, "memory_mb": cores * 1024});
                let request = client.post(format!("{base}/v1/devices/{id}/resize")).json(&body);
                (Operation::Resize, request)
            }
            (false, _) => (Operation::Start, client.post(format!("{base}/v1/devices/{id}/start"))),
        };
        let command = PortalCommand {
            operation,
            device: Some(index),
        };
        (command, request)
    }

    /// Brings the client's picture of the fleet up to date once the command succeeded with
    /// `body` as its answer.
    pub fn succeeded(self, fleet: &mut Vec<Device>, body: &serde_json::Value) {
        match (self.operation, self.device) {
            (Operation::Create, _) => {
                if let Some(id) = body["id"].as_str().and_then(|s| s.parse().ok()) {
                    fleet.push(Device { id, running: false });
                }
            }
            (Operation::Delete, Some(i)) => {
                fleet.swap_remove(i);
            }
            (Operation::Start, Some(i)) => fleet[i].running = true,
            (Operation::Stop, Some(i)) => fleet[i].running = false,
            _ => {}
        }
    }
}
