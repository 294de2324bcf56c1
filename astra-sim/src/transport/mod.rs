//! The one transport of the workspace (libtorch-free): the checked frame format, dialling and
//! accepting with deadlines, reader threads that turn a socket into a channel of frames, session
//! keys, the full mesh of N processes, a user-space uplink shaper, and UDP multicast for index
//! messages sent once to every peer. astra-eval's runtime (the device engine over TCP) and
//! astra-sim's live replay (slept compute, real bytes) both run on it; shaped links and their
//! namespaces are in [`crate::live`].

pub mod frame;
pub mod multicast;
pub mod net;
pub mod shaper;

pub use frame::{Frame, FrameError, PROTOCOL};
