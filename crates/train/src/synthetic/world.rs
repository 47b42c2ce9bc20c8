//! The synthetic world's vocabulary: the object classes captions name (with the category
//! that picks their motion verbs), colours, background stuff, motions with their phrasings
//! and box velocities, and the English caption templates.

use demovlp_kernels::rng::Rng;

use super::ObjectSpec;

/// Object classes the captions name, with the category that picks their motion verbs.
pub(super) const OBJECTS: &[(&str, Cat)] = &[
    ("dog", Cat::Animal),
    ("cat", Cat::Animal),
    ("horse", Cat::Animal),
    ("cow", Cat::Animal),
    ("sheep", Cat::Animal),
    ("bird", Cat::Animal),
    ("elephant", Cat::Animal),
    ("bear", Cat::Animal),
    ("man", Cat::Person),
    ("woman", Cat::Person),
    ("child", Cat::Person),
    ("boy", Cat::Person),
    ("girl", Cat::Person),
    ("car", Cat::Vehicle),
    ("bus", Cat::Vehicle),
    ("truck", Cat::Vehicle),
    ("bicycle", Cat::Vehicle),
    ("motorcycle", Cat::Vehicle),
    ("boat", Cat::Vehicle),
    ("train", Cat::Vehicle),
    ("ball", Cat::Thing),
    ("kite", Cat::Thing),
    ("balloon", Cat::Thing),
    ("drone", Cat::Thing),
];

pub(super) const COLOURS: &[&str] = &["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink"];

/// Background stuff: present as clutter regions, never named in a caption.
pub(super) const BACKGROUNDS: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cat {
    Animal,
    Person,
    Vehicle,
    Thing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Motion {
    Left,
    Right,
    Up,
    Down,
    Still,
}

pub(super) const MOTIONS: [Motion; 5] = [Motion::Left, Motion::Right, Motion::Up, Motion::Down, Motion::Still];

impl Motion {
    /// Two phrasings per category, so captions vary while meaning stays fixed.
    pub(super) fn phrases(self, cat: Cat) -> [&'static str; 2] {
        use Motion::*;
        match (cat, self) {
            (Cat::Animal, Left) => ["runs to the left", "walks to the left"],
            (Cat::Animal, Right) => ["runs to the right", "walks to the right"],
            (Cat::Animal, Up) => ["jumps up", "climbs up"],
            (Cat::Animal, Down) => ["jumps down", "climbs down"],
            (Cat::Animal, Still) => ["stands still", "sits still"],
            (Cat::Person, Left) => ["walks to the left", "runs to the left"],
            (Cat::Person, Right) => ["walks to the right", "runs to the right"],
            (Cat::Person, Up) => ["climbs up", "goes up the stairs"],
            (Cat::Person, Down) => ["goes down", "comes down the stairs"],
            (Cat::Person, Still) => ["stands still", "waits"],
            (Cat::Vehicle, Left) => ["drives to the left", "moves to the left"],
            (Cat::Vehicle, Right) => ["drives to the right", "moves to the right"],
            (Cat::Vehicle, Up) => ["goes up a hill", "moves up"],
            (Cat::Vehicle, Down) => ["goes down a hill", "moves down"],
            (Cat::Vehicle, Still) => ["is parked", "stays in place"],
            (Cat::Thing, Left) => ["flies to the left", "drifts to the left"],
            (Cat::Thing, Right) => ["flies to the right", "drifts to the right"],
            (Cat::Thing, Up) => ["rises up", "floats up"],
            (Cat::Thing, Down) => ["falls down", "drops down"],
            (Cat::Thing, Still) => ["hangs in place", "stays still"],
        }
    }

    /// Box-centre velocity per frame, as a fraction of the image size.
    pub(super) fn velocity(self) -> (f32, f32) {
        match self {
            Motion::Left => (-0.07, 0.0),
            Motion::Right => (0.07, 0.0),
            Motion::Up => (0.0, -0.06),
            Motion::Down => (0.0, 0.06),
            Motion::Still => (0.0, 0.0),
        }
    }
}

/// A caption for a clip whose main object is `main` (English templates; `variant` picks
/// the phrasing, so a clip's several captions differ while meaning the same).
pub(super) fn caption(rng: &mut Rng, main: &ObjectSpec, second: Option<&ObjectSpec>, image: bool, variant: usize) -> String {
    let (name, cat) = OBJECTS[main.class];
    let colour = COLOURS[main.colour];
    let art = |w: &str| if w.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    let phrases = main.motion.phrases(cat);
    let verb = phrases[(variant + rng.below(2)) % 2];
    let tail = match second {
        Some(s) => {
            let (n2, _) = OBJECTS[s.class];
            let c2 = COLOURS[s.colour];
            match rng.below(3) {
                0 => format!(" past {} {c2} {n2}", art(c2)),
                1 => format!(" near {} {n2}", art(n2)),
                _ => format!(" next to {} {c2} {n2}", art(c2)),
            }
        }
        None => String::new(),
    };
    if image {
        // Still images: no motion words, photo-caption style.
        let lead = ["a photo of", "picture of", "there is"][rng.below(3)];
        return format!("{lead} {} {colour} {name}{tail}", art(colour));
    }
    match (variant + rng.below(3)) % 3 {
        0 => format!("{} {colour} {name} {verb}{tail}", art(colour)),
        1 => format!("the {colour} {name} {verb}{tail}"),
        _ => format!("in this video {} {colour} {name} {verb}{tail}", art(colour)),
    }
}
