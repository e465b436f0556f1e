//! Builds the receipt a node signs for a task, signs it, and checks it the way the
//! coordinator does. The printed commitment and signature are the same on every architecture
//! (ed25519 is deterministic), which is what lets a gateway check a Raspberry Pi's work.
//!
//! ```sh
//! cargo run -p ambient-core --example receipt
//! ```

use ambient_core::{
    Engine, Exit, Expected, Identity, Limits, Receipt, TaskId, VerifyError, sha3_256,
    verify_receipt,
};

fn main() -> Result<(), VerifyError> {
    // A real agent generates its secret once and keeps it in its state directory.
    let identity = Identity::from_secret(&[7; 32]);
    let task_id = TaskId::new("example-task").expect("letters and a dash are a valid task id");
    let (module, input, output) = (b"\0asm\x01\0\0\0".as_slice(), b"hello", b"HELLO");
    let limits = Limits {
        fuel: 1_000_000,
        ..Limits::default()
    };

    let receipt = Receipt {
        task_id: task_id.clone(),
        attempt: 1,
        node: identity.node_id(),
        module: sha3_256(module),
        input: sha3_256(input),
        output: sha3_256(output),
        fuel_used: 807,
        limits,
        engine: Engine::Wasmtime,
        exit: Exit::Ok,
    };
    println!("node        {}", identity.node_id());
    println!("commitment  {}", receipt.commitment());
    let signed = receipt.sign(&identity);
    println!("signature   {}", hex(&signed.signature));

    // The coordinator's side: everything must match what it assigned.
    let public_key = identity.public_key();
    let expected = Expected {
        task_id: &task_id,
        attempt: 1,
        node: identity.node_id(),
        public_key: &public_key,
        module: sha3_256(module),
        input: sha3_256(input),
        limits,
    };
    verify_receipt(&signed, output, &expected)?;
    println!("verified    ok");

    // A node that lies about its output is caught.
    let lie = verify_receipt(&signed, b"hello", &expected);
    println!(
        "wrong output: {}",
        lie.err().map_or("accepted".into(), |e| e.to_string())
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
