//! The lesson's producer/consumer: a queue of capacity 2 and five items.
//!
//! Prints `put item-0`, `got item-0`, ... `put item-4`, `got item-4`, one pair every 100 ms.
//! Unlike the lesson's `queue.put(None)`, the end is explicit ([`Producer::end`]): no sentinel
//! value, and a producer that dies without ending is reported to the consumer as such.
//!
//! ```text
//! cargo run -p sluice-flow --example queue
//! ```

use std::convert::Infallible;
use std::time::Duration;

use sluice_flow::{queue, Consumer, Producer};

async fn producer(queue: Producer<String, Infallible>, count: usize) {
    for i in 0..count {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if queue.send(format!("item-{i}")).await.is_err() {
            return; // the consumer left: stop producing
        }
        println!("put item-{i}");
    }
    queue.end();
}

async fn consumer(mut queue: Consumer<String, Infallible>) {
    while let Some(item) = queue.recv().await {
        match item {
            Ok(item) => println!("got {item}"),
            Err(e) => println!("the producer did not finish: {e}"),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (tx, rx) = queue::bounded(2);
    // `await asyncio.gather(producer(queue, 5), consumer(queue))`
    tokio::join!(producer(tx, 5), consumer(rx));
}
